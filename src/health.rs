//! Health checks: a TCP connect probe per backend and the rise/fall state
//! machine that turns probe results into up/down.
//!
//! Each backend has its own probe task on its own schedule, so a slow or
//! hanging backend (bounded by `timeout`, which validation keeps at or below
//! `interval`) never delays another's probes. First probes are spread over
//! the start of the first interval so a large pool does not probe in one
//! burst. A flip is logged, stored in the backend's live state (so a reload
//! keeps it), and triggers a rebuild of the listener's pool.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::backend::Backend;
use crate::config::{HealthCheck, OnMarkedDown};
use crate::sockets;

/// First probes of a pool are spread over at most this long (or the
/// interval, if shorter): long enough to smooth a burst of 1000 connects,
/// short enough that a fresh backend's health is known within a second.
pub const FIRST_PROBE_SPREAD: Duration = Duration::from_secs(1);

/// A change of health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    Down,
    Up,
}

/// Consecutive-result counters with hysteresis (HAProxy's rise/fall).
///
/// A new backend starts up and unprobed. Its very first probe, if it fails,
/// marks it down at once (a backend that is not there should not wait
/// `fall` intervals for its first verdict); afterwards `fall` consecutive
/// failures mark it down and `rise` consecutive successes mark it up. A
/// result resets the opposite counter.
#[derive(Debug, Clone)]
pub struct Hysteresis {
    up: bool,
    probed: bool,
    successes: u32,
    failures: u32,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis {
            up: true,
            probed: false,
            successes: 0,
            failures: 0,
        }
    }
}

impl Hysteresis {
    /// Record one probe result; returns the flip it causes, if any.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Flip> {
        let first = !self.probed;
        self.probed = true;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise {
                self.up = true;
                return Some(Flip::Up);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && (first || self.failures >= fall) {
                self.up = false;
                return Some(Flip::Down);
            }
        }
        None
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// The length of the current run of equal results.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }
}

/// One probe: success is an established TCP connection within `timeout`.
pub async fn probe(backend: &Backend, timeout: Duration) -> io::Result<()> {
    // Closed at once: the probe's only question is "does it accept?".
    sockets::connect(backend.addr, timeout, None)
        .await
        .map(drop)
}

/// What a probe task needs to know about its listener.
#[derive(Debug, Clone)]
pub struct ProbeContext {
    pub listener: Arc<str>,
    pub settings: HealthCheck,
    pub on_marked_down: OnMarkedDown,
    /// Delay before the first probe (spreads a pool's first probes).
    pub first_delay: Duration,
}

/// Probe `backend` for ever on its own schedule; `changed` is called after
/// each flip (the listener rebuilds its pool).
pub async fn run(backend: Arc<Backend>, ctx: ProbeContext, changed: impl Fn()) {
    let mut ticks =
        tokio::time::interval_at(Instant::now() + ctx.first_delay, ctx.settings.interval);
    // A probe that took long does not cause a burst of catch-up probes.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let started = Instant::now();
        let result = probe(&backend, ctx.settings.timeout).await;
        let state = &backend.state;
        state.record_check(result.is_ok(), started.elapsed());
        let (flip, streak) = {
            let mut h = state.hysteresis.lock().unwrap_or_else(|e| e.into_inner());
            let flip = h.observe(result.is_ok(), ctx.settings.rise, ctx.settings.fall);
            (flip, h.streak())
        };
        let Some(flip) = flip else { continue };
        match (flip, &result) {
            (Flip::Down, Err(e)) => {
                warn!(listener = %ctx.listener, backend = %backend.name, address = %backend.addr, reason = %e, failures = streak, "backend down");
                state.set_up(false);
                // Idle keep-alive connections (HTTP mode) lead nowhere now.
                state.http_pool.clear();
                if ctx.on_marked_down == OnMarkedDown::Shutdown {
                    state.cut_connections();
                }
            }
            _ => {
                info!(listener = %ctx.listener, backend = %backend.name, address = %backend.addr, successes = streak, "backend up");
                state.set_up(true);
            }
        }
        changed();
    }
}

/// First-probe delay of backend `index` of `count`: spread evenly over
/// [`FIRST_PROBE_SPREAD`] or the interval, whichever is shorter.
pub fn first_delay(index: usize, count: usize, interval: Duration) -> Duration {
    let spread = FIRST_PROBE_SPREAD.min(interval);
    spread.mul_f64(index as f64 / count.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_seq(h: &mut Hysteresis, results: &str, rise: u32, fall: u32) -> Vec<Option<Flip>> {
        results
            .chars()
            .map(|c| h.observe(c == '+', rise, fall))
            .collect()
    }

    #[test]
    fn first_failed_probe_marks_down_at_once() {
        let mut h = Hysteresis::default();
        assert!(h.is_up());
        assert_eq!(run_seq(&mut h, "-", 2, 3), [Some(Flip::Down)]);
    }

    #[test]
    fn fall_consecutive_failures_mark_down_exactly() {
        let mut h = Hysteresis::default();
        let got = run_seq(&mut h, "+--+---", 2, 3);
        assert_eq!(
            got,
            [None, None, None, None, None, None, Some(Flip::Down)],
            "a success resets the failure count"
        );
        assert!(!h.is_up());
    }

    #[test]
    fn rise_consecutive_successes_mark_up_exactly() {
        let mut h = Hysteresis::default();
        run_seq(&mut h, "-", 2, 3);
        let got = run_seq(&mut h, "+-++", 2, 3);
        assert_eq!(got, [None, None, None, Some(Flip::Up)]);
        assert!(h.is_up());
        // Further failures need the full `fall` again (not first-probe rule).
        assert_eq!(run_seq(&mut h, "--", 2, 3), [None, None]);
        assert_eq!(run_seq(&mut h, "-", 2, 3), [Some(Flip::Down)]);
    }

    #[test]
    fn fall_and_rise_of_one_flip_on_every_change() {
        let mut h = Hysteresis::default();
        let got = run_seq(&mut h, "+-+-", 1, 1);
        assert_eq!(
            got,
            [None, Some(Flip::Down), Some(Flip::Up), Some(Flip::Down)]
        );
    }

    #[test]
    fn first_probes_are_spread_within_the_interval() {
        let interval = Duration::from_millis(400);
        assert_eq!(first_delay(0, 4, interval), Duration::ZERO);
        assert_eq!(first_delay(2, 4, interval), Duration::from_millis(200));
        assert!(first_delay(999, 1000, Duration::from_secs(2)) < FIRST_PROBE_SPREAD);
    }

    /// The probe loop against a backend that fails, with tokio's clock
    /// paused: transitions land on exact probe counts without real waiting.
    #[tokio::test(start_paused = true)]
    async fn probe_loop_marks_a_refusing_backend_down_and_cuts_connections() {
        use crate::backend::BackendState;
        use crate::config::BackendConfig;
        use std::sync::atomic::{AtomicUsize, Ordering};

        // A port that refuses: bound and released.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let backend = Arc::new(Backend::new(
            &BackendConfig {
                name: "b".into(),
                address: addr.to_string(),
                addr,
                weight: 1,
                backup: false,
                max_connections: None,
            },
            Arc::new(BackendState::default()),
        ));
        // Probed once already and healthy: the full `fall` applies.
        backend.state.hysteresis.lock().unwrap().observe(true, 2, 3);
        let cut = backend.state.cut_signal();
        let flips = Arc::new(AtomicUsize::new(0));
        let f = flips.clone();
        let ctx = ProbeContext {
            listener: "l".into(),
            settings: HealthCheck {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                fall: 3,
                rise: 2,
            },
            on_marked_down: OnMarkedDown::Shutdown,
            first_delay: Duration::ZERO,
        };
        let task = tokio::spawn(run(backend.clone(), ctx, move || {
            f.fetch_add(1, Ordering::SeqCst);
        }));
        while backend.state.checks().1 < 2 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(backend.state.is_up(), "still up after 2 failures");
        assert!(!cut.is_tripped());
        while backend.state.checks().1 < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!backend.state.is_up(), "down after the 3rd failure");
        assert!(cut.is_tripped(), "open connections are cut");
        assert!(
            !backend.state.cut_signal().is_tripped(),
            "a fresh signal for new connections"
        );
        assert_eq!(flips.load(Ordering::SeqCst), 1);
        task.abort();
    }
}
