//! Periodic work that many tasks do side by side (a probe per backend, a
//! lookup per discovered name): first runs spread out, so a large pool does
//! not act in one burst, and ticks that never burst to catch up.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// First runs of a set of tasks are spread over at most this long (or the
/// interval, if shorter): long enough to smooth a burst of 1000 connects,
/// short enough that a fresh backend's health is known within a second.
pub const FIRST_SPREAD: Duration = Duration::from_secs(1);

/// First-run delay of task `index` of `count`: spread evenly over
/// [`FIRST_SPREAD`] or the interval, whichever is shorter.
pub fn first_delay(index: usize, count: usize, interval: Duration) -> Duration {
    let spread = FIRST_SPREAD.min(interval);
    spread.mul_f64(index as f64 / count.max(1) as f64)
}

/// Ticks from `start` every `every`; a run that took long does not cause a
/// burst of catch-up runs.
pub fn schedule(start: Instant, every: Duration) -> Interval {
    let mut ticks = tokio::time::interval_at(start, every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_runs_are_spread_within_the_interval() {
        let interval = Duration::from_millis(400);
        assert_eq!(first_delay(0, 4, interval), Duration::ZERO);
        assert_eq!(first_delay(2, 4, interval), Duration::from_millis(200));
        assert!(first_delay(999, 1000, Duration::from_secs(2)) < FIRST_SPREAD);
    }
}
