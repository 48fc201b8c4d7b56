//! The rise/fall state machine that turns check results into up/down
//! (HAProxy's `rise`/`fall`). It knows no protocol and no clock: a result
//! in, perhaps a flip out.

/// A change of health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    Down,
    Up,
}

/// Consecutive-result counters with hysteresis.
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
    /// A verdict already reached elsewhere (by the process a live upgrade
    /// took over from): no first-check shortcut, rise and fall from here.
    pub fn carried(up: bool) -> Hysteresis {
        Hysteresis {
            up,
            probed: true,
            ..Hysteresis::default()
        }
    }

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

    #[cfg(test)]
    fn is_up(&self) -> bool {
        self.up
    }

    /// The length of the current run of equal results.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }
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
    fn streak_counts_the_current_run() {
        let mut h = Hysteresis::default();
        run_seq(&mut h, "++-", 2, 3);
        assert_eq!(h.streak(), 1);
        run_seq(&mut h, "--", 2, 3);
        assert_eq!(h.streak(), 3);
    }
}
