//! Weighted least connections.
//!
//! The backend whose load after taking this connection, `(active + 1) /
//! weight`, is lowest wins — HAProxy's rule, which with equal weights is plain
//! "fewest active" and with unequal weights keeps active counts in proportion
//! to the weights. Ties go round robin: each pick starts at the next position
//! of a rotating ticket and takes the first least-loaded backend from there.
//!
//! The first pick for a connection reads a [`LoadTree`] that every member's
//! opens and closes keep current, so it costs the same at 1 000 backends as
//! at 3. A retry after a failed connect, which must skip the backends
//! already tried, scans the members' counters instead (relaxed atomic loads,
//! no locks). Concurrent picks may both see the same minimum; that is the
//! usual, harmless race of every least-connection balancer.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::load_tree::LoadTree;
use super::{Cursor, Scheduler, Tried};
use prometheus::IntGauge;

use crate::backend::Backend;

#[derive(Debug)]
pub struct LeastConn {
    members: Box<[Member]>,
    tree: Arc<LoadTree>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Member {
    index: usize,
    weight: u64,
    /// The backend's active-connection gauge itself, for the retry scan.
    active: IntGauge,
}

impl LeastConn {
    /// A scheduler over the `eligible` backends, which report their loads
    /// to it from now on.
    pub fn new(backends: &[Arc<Backend>], eligible: &[usize]) -> LeastConn {
        let loads: Vec<(u32, u64)> = eligible
            .iter()
            .map(|&i| (backends[i].weight, backends[i].state.active()))
            .collect();
        let tree = LoadTree::new(&loads);
        for (leaf, &i) in eligible.iter().enumerate() {
            let state = &backends[i].state;
            state.report_load_to(Some(tree.slot(leaf)));
            // A close between reading the count above and attaching the
            // slot would be lost: read it once more.
            tree.slot(leaf).set(state.active());
        }
        LeastConn {
            members: eligible
                .iter()
                .map(|&i| Member {
                    index: i,
                    weight: u64::from(backends[i].weight),
                    active: backends[i].state.metrics.active.clone(),
                })
                .collect(),
            tree,
            next: AtomicUsize::new(0),
        }
    }

    /// The least-loaded member not yet tried, first in rotated order.
    fn scan(&self, start: usize, cursor: &Cursor, tried: &Tried) -> Option<usize> {
        let (tail, head) = self.members.split_at(start);
        // (load numerator, weight, index) of the best so far.
        let mut best: Option<(u64, u64, usize)> = None;
        for m in head.iter().chain(tail) {
            if cursor.step > 0 && tried.contains(m.index) {
                continue;
            }
            let load = m.active.get().max(0) as u64 + 1;
            // load/m.weight < best_load/best_weight, without division.
            let better = match best {
                None => true,
                Some((bl, bw, _)) => load * bw < bl * m.weight,
            };
            if better {
                best = Some((load, m.weight, m.index));
            }
        }
        best.map(|(_, _, i)| i)
    }
}

impl Scheduler for LeastConn {
    fn next(&self, _client: IpAddr, cursor: &mut Cursor, tried: &Tried) -> Option<usize> {
        if cursor.step == 0 {
            cursor.pos = self.next.fetch_add(1, Relaxed);
        }
        let start = cursor.pos % self.members.len();
        if cursor.step == 0
            && let Some(leaf) = self.tree.first_least_from(start)
        {
            return Some(self.members[leaf].index);
        }
        self.scan(start, cursor, tried)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::Pool;
    use super::super::test_support::*;
    use crate::backend::ActiveGuard;
    use crate::config::Algorithm;

    /// Take `n` connections one after another, holding each open.
    fn hold(pool: &Pool, n: usize) -> (Vec<usize>, Vec<ActiveGuard>) {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut order = Vec::new();
        let mut guards = Vec::new();
        for _ in 0..n {
            let b = pool.candidates(ip).next().unwrap();
            order.push(
                pool.backends
                    .iter()
                    .position(|x| std::ptr::eq(&**x, &**b))
                    .unwrap(),
            );
            guards.push(b.state.enter());
        }
        (order, guards)
    }

    #[test]
    fn goes_to_the_least_loaded() {
        let pool = Pool::new(Algorithm::Leastconn, backends(&[1, 1, 1]));
        let _busy: Vec<_> = (0..3).map(|_| pool.backends[0].state.enter()).collect();
        let _one = pool.backends[1].state.enter();
        let (order, _g) = hold(&pool, 3);
        // b2 (0) first, then b1 and b2 tie at 1 → both before b0 (3).
        assert_eq!(order[0], 2);
        let mut rest = order[1..].to_vec();
        rest.sort();
        assert_eq!(rest, [1, 2]);
    }

    #[test]
    fn ties_rotate_when_connections_close_at_once() {
        let pool = Pool::new(Algorithm::Leastconn, backends(&[1, 1, 1]));
        assert_eq!(picks(&pool, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_close_counts_at_once_in_the_current_pool_only() {
        let list = backends(&[1, 1]);
        let old = Pool::new(Algorithm::Leastconn, list.clone());
        let mut on_first: Vec<_> = (0..3).map(|_| list[0].state.enter()).collect();
        let _on_second: Vec<_> = (0..2).map(|_| list[1].state.enter()).collect();
        assert_eq!(picks(&old, 1), [1]);
        // A rebuilt pool takes over the counts and every later change.
        let pool = Pool::new(Algorithm::Leastconn, list.clone());
        assert_eq!(picks(&pool, 1), [1]);
        on_first.truncate(1);
        assert_eq!(picks(&pool, 2), [0, 0]);
        // Retries skip the first choice and still go by load.
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let order: Vec<_> = pool.candidates(ip).map(|b| b.name.to_string()).collect();
        assert_eq!(order, ["b0", "b1"]);
    }

    #[test]
    fn weights_keep_active_counts_proportional() {
        let pool = Pool::new(Algorithm::Leastconn, backends(&[1, 3]));
        let (order, _g) = hold(&pool, 40);
        let on_heavy = order.iter().filter(|&&i| i == 1).count();
        assert_eq!(on_heavy, 30);
        assert_eq!(pool.backends[0].state.active(), 10);
    }
}
