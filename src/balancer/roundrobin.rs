//! Smooth weighted round robin, precomputed.
//!
//! The cycle of `sum(weights)` picks is computed once when the pool is built:
//! backend `i`'s `k`-th pick in the cycle is placed at the fraction
//! `(k + ½) / weight_i`, and all picks are sorted by that fraction (ties by
//! config order). Every backend therefore appears exactly `weight` times per
//! cycle — so any window of `sum(weights)` consecutive connections holds
//! exactly each backend's share — and its picks are spread evenly through the
//! cycle rather than bunched (weights 1,2,3 give `c b a c b c`). A pick is one
//! atomic increment and an array read.

use std::cmp::Ordering;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::{Cursor, Scheduler, Tried};
use crate::backend::Backend;

#[derive(Debug)]
pub struct RoundRobin {
    /// One full cycle of backend indices.
    cycle: Box<[u32]>,
    /// Tickets handed out so far.
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(backends: &[Arc<Backend>], eligible: &[usize]) -> RoundRobin {
        // (k, weight, index): the k-th pick of backend `index`.
        let mut picks: Vec<(u64, u64, usize)> = eligible
            .iter()
            .flat_map(|&i| {
                let w = u64::from(backends[i].weight);
                (0..w).map(move |k| (k, w, i))
            })
            .collect();
        // Compare (2k+1)/(2w) exactly: (2k1+1)·w2 vs (2k2+1)·w1.
        picks.sort_by(|a, b| {
            let lhs = (2 * a.0 + 1) * b.1;
            let rhs = (2 * b.0 + 1) * a.1;
            lhs.cmp(&rhs).then(a.2.cmp(&b.2)).then(Ordering::Equal)
        });
        RoundRobin {
            cycle: picks.into_iter().map(|(_, _, i)| i as u32).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

impl Scheduler for RoundRobin {
    fn next(&self, _client: IpAddr, cursor: &mut Cursor, _tried: &Tried) -> Option<usize> {
        if cursor.step == 0 {
            cursor.pos = self.next.fetch_add(1, Relaxed);
        }
        // Retries walk on through the cycle from the first pick; one full
        // cycle visits every eligible backend.
        if cursor.step >= self.cycle.len() {
            return None;
        }
        let slot = cursor.pos.wrapping_add(cursor.step) % self.cycle.len();
        Some(self.cycle[slot] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Pool;
    use super::super::test_support::*;
    use crate::config::Algorithm;

    fn pool(weights: &[u32]) -> Pool {
        Pool::new(Algorithm::Roundrobin, backends(weights))
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(picks(&pool(&[1, 1, 1]), 7), [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn weights_are_smooth_and_exact_in_every_window() {
        let p = pool(&[1, 2, 3]);
        let seq = picks(&p, 60);
        assert_eq!(&seq[..6], &[2, 1, 0, 2, 1, 2]);
        for start in 0..(seq.len() - 6) {
            let mut counts = [0; 3];
            for &i in &seq[start..start + 6] {
                counts[i] += 1;
            }
            assert_eq!(counts, [1, 2, 3], "window at {start}");
        }
    }

    #[test]
    fn heavy_weights_never_burst() {
        // 5:1 — the light backend sits in the middle, not at an end.
        assert_eq!(picks(&pool(&[5, 1]), 6), [0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn zero_weight_is_skipped() {
        assert_eq!(picks(&pool(&[1, 0, 1]), 4), [0, 2, 0, 2]);
    }
}
