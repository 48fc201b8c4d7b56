//! systemd integration: readiness, reload and stop notifications, and the
//! watchdog (`Type=notify`, `WatchdogSec=`).
//!
//! Every call is a no-op unless systemd (or anything else) set
//! `NOTIFY_SOCKET`, so the daemon behaves the same in a terminal.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Every listener is bound and the config loaded.
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// A reload begins; [`ready`] ends it. systemd wants the monotonic time so
/// it can tell this reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(e) => {
            debug!(error = %e, "no monotonic clock for MONOTONIC_USEC");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// A live upgrade's new process (`pid`) has taken over: systemd follows
/// it as the service's main process (sent by the old one, which still is).
pub fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Ping the watchdog at half its period, as `sd_watchdog_enabled(3)`
/// advises. The task runs on the runtime that serves traffic, so a wedged
/// runtime stops pinging and systemd restarts the service.
pub fn spawn_watchdog() -> Option<JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(1));
    info!(period = ?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
