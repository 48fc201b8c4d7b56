//! Least-connection picks in O(log n): a min-tree over the backends' loads,
//! updated when a connection to one of them opens or closes.
//!
//! Leaf `i` holds backend `i`'s load after taking one more connection,
//! `(active + 1) / weight`, as a 32.32 fixed-point number; every inner node
//! holds the least load below it. A pick reads the root and walks down to the
//! first leaf at or after a rotating start that holds that least load — the
//! same backend a full scan would choose, in about twenty reads instead of one
//! per backend.
//!
//! Writers (a connection's open and close, through its backend's
//! [`LoadSlot`]) take a short lock and recompute one leaf-to-root path from
//! the backend's live counter, so the tree always converges on the counters,
//! whatever order concurrent updates land in. Readers take no lock: a pick
//! racing an update may see a path half-updated and settle on a backend one
//! connection off the minimum — the race every least-connection balancer has
//! between reading a count and the connect that raises it.
//!
//! This is a leaf: the backend's live state points here without knowing
//! about schedulers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct LoadTree {
    /// Leaves padded to a power of two.
    width: usize,
    /// Heap layout: `nodes[1]` is the root, `nodes[width + i]` leaf `i`;
    /// padding leaves hold `u64::MAX`.
    nodes: Box<[AtomicU64]>,
    weights: Box<[u32]>,
    /// Serialises writers; readers never take it.
    write: Mutex<()>,
}

/// Where one backend's load lives in the tree of the pool it is in.
#[derive(Debug)]
pub struct LoadSlot {
    tree: Arc<LoadTree>,
    leaf: usize,
}

impl LoadSlot {
    /// Record that the backend now has `active` connections.
    pub fn set(&self, active: u64) {
        self.tree.set(self.leaf, active);
    }
}

/// `(active + 1) / weight` in 32.32 fixed point. Weights are at most
/// `MAX_WEIGHT` (256), so two different loads differ by at least 2⁻¹⁶ and
/// never round to the same key; equal loads give equal keys.
fn key(active: u64, weight: u32) -> u64 {
    let taken = active.min(u64::from(u32::MAX - 1)) + 1;
    (taken << 32) / u64::from(weight.max(1))
}

impl LoadTree {
    /// A tree over backends with these `(weight, active)` pairs.
    pub fn new(members: &[(u32, u64)]) -> Arc<LoadTree> {
        let width = members.len().max(1).next_power_of_two();
        let nodes: Box<[AtomicU64]> = (0..2 * width).map(|_| AtomicU64::new(u64::MAX)).collect();
        for (i, &(weight, active)) in members.iter().enumerate() {
            nodes[width + i].store(key(active, weight), Relaxed);
        }
        for n in (1..width).rev() {
            let least = nodes[2 * n]
                .load(Relaxed)
                .min(nodes[2 * n + 1].load(Relaxed));
            nodes[n].store(least, Relaxed);
        }
        Arc::new(LoadTree {
            width,
            nodes,
            weights: members.iter().map(|&(w, _)| w).collect(),
            write: Mutex::new(()),
        })
    }

    /// The slot through which leaf `leaf`'s backend reports its load.
    pub fn slot(self: &Arc<Self>, leaf: usize) -> LoadSlot {
        LoadSlot {
            tree: self.clone(),
            leaf,
        }
    }

    fn set(&self, leaf: usize, active: u64) {
        // A poisoned lock only means a writer panicked between two stores
        // of plain numbers; the next write repairs its path.
        let _w = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = self.width + leaf;
        self.nodes[n].store(key(active, self.weights[leaf]), Relaxed);
        while n > 1 {
            n /= 2;
            let least = self.nodes[2 * n]
                .load(Relaxed)
                .min(self.nodes[2 * n + 1].load(Relaxed));
            if self.nodes[n].swap(least, Relaxed) == least {
                break;
            }
        }
    }

    /// The first backend at or after `start` (wrapping around) whose load
    /// is the least of all; `None` only for an empty tree or while a
    /// concurrent update leaves no leaf matching the root (the caller then
    /// falls back to a scan).
    pub fn first_least_from(&self, start: usize) -> Option<usize> {
        let least = self.nodes[1].load(Relaxed);
        if least == u64::MAX {
            return None;
        }
        self.first_at_most(start, least)
            .or_else(|| self.first_at_most(0, least))
            .filter(|&i| i < self.weights.len())
    }

    /// The first leaf at or after `start` holding at most `least`.
    fn first_at_most(&self, start: usize, least: u64) -> Option<usize> {
        let at = |n: usize| self.nodes[n].load(Relaxed);
        let mut n = self.width + start;
        if at(n) <= least {
            return Some(start);
        }
        loop {
            // Up while `n` is a right child, then over to the right
            // sibling: the next subtree of leaves after `n`'s.
            while n > 1 && n % 2 == 1 {
                n /= 2;
            }
            if n == 1 {
                return None;
            }
            n += 1;
            if at(n) <= least {
                while n < self.width {
                    n *= 2;
                    if at(n) > least {
                        n += 1;
                    }
                }
                return Some(n - self.width);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a full scan picks: the first least load at or after `start`.
    fn scan(members: &[(u32, u64)], start: usize) -> usize {
        let n = members.len();
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| key(members[i].1, members[i].0))
            .unwrap()
    }

    #[test]
    fn picks_what_a_scan_picks_through_every_update() {
        let mut members: Vec<(u32, u64)> = (0..37u64)
            .map(|i| (1 + (i % 4) as u32, i * 7 % 5))
            .collect();
        let tree = LoadTree::new(&members);
        let mut x = 12_345u64;
        for round in 0..5_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = (x % members.len() as u64) as usize;
            let active = &mut members[i].1;
            *active = if x & 1 == 0 {
                *active + 1
            } else {
                active.saturating_sub(1)
            };
            tree.slot(i).set(*active);
            let start = round % members.len();
            assert_eq!(
                tree.first_least_from(start),
                Some(scan(&members, start)),
                "round {round}"
            );
        }
    }

    #[test]
    fn weights_scale_the_load() {
        // 3 active at weight 4 → 1.0; 1 active at weight 1 → 2.0.
        let tree = LoadTree::new(&[(1, 1), (4, 3)]);
        assert_eq!(tree.first_least_from(0), Some(1));
        tree.slot(1).set(8);
        assert_eq!(tree.first_least_from(1), Some(0));
    }

    #[test]
    fn one_backend_and_padding_leaves() {
        let tree = LoadTree::new(&[(1, 0)]);
        assert_eq!(tree.first_least_from(0), Some(0));
        let tree = LoadTree::new(&[(1, 5), (1, 5), (1, 5)]);
        assert_eq!(tree.first_least_from(2), Some(2));
        assert_eq!(tree.first_least_from(1), Some(1));
    }
}
