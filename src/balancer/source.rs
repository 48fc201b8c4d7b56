//! Source-IP hashing: weighted rendezvous hashing, precomputed into slots.
//!
//! A client IP hashes to one of [`SLOTS`] slots. Each slot belongs to the
//! backend with the highest rendezvous score for it, `weight / -ln(u)` where
//! `u` is a uniform hash of (backend name, slot) — weighted rendezvous
//! (highest-random-weight) hashing. The owner table is built once per pool,
//! so a lookup is one hash and one array read.
//!
//! Why this and not Maglev or a ring: the owner of a slot depends only on the
//! scores of the backends present, so
//! - removing a backend (down, drained, deleted) moves exactly the slots it
//!   owned, to their second-best backend, and no other client moves;
//! - the table depends on backend *names* and weights only, never on their
//!   order in the file or on the process, so two instances of an HA pair and
//!   a restarted daemon agree on every client.
//!
//! The slot count is fixed (it must not change with the backend count, or
//! every client would move when one backend is added).

use std::net::IpAddr;
use std::sync::Arc;

use super::hash::{hash_bytes, hash_ip, mix64};
use super::{Cursor, Scheduler, Tried};
use crate::backend::Backend;

/// Slots in the owner table: 2^16 gives every backend of a 1000-backend pool
/// about 65 slots (shares within a few percent of its weight) while the table
/// stays 256 KiB and a rebuild over 100 backends takes a few milliseconds.
pub const SLOTS: usize = 1 << 16;

#[derive(Debug)]
pub struct SourceHash {
    /// Owner (backend index) of every slot.
    table: Box<[u32]>,
    /// Eligible backends grouped by weight, for ranking on retries.
    groups: Box<[Group]>,
}

#[derive(Debug)]
struct Group {
    weight: f64,
    /// (backend index, name key) of every backend with this weight.
    members: Vec<(usize, u64)>,
}

impl SourceHash {
    pub fn new(backends: &[Arc<Backend>], eligible: &[usize]) -> SourceHash {
        let mut groups: Vec<Group> = Vec::new();
        for &i in eligible {
            let b = &backends[i];
            let weight = f64::from(b.weight);
            let key = hash_bytes(b.name.as_bytes());
            match groups.iter_mut().find(|g| g.weight == weight) {
                Some(g) => g.members.push((i, key)),
                None => groups.push(Group {
                    weight,
                    members: vec![(i, key)],
                }),
            }
        }
        let table = (0..SLOTS)
            .map(|slot| best(&groups, slot_seed(slot)) as u32)
            .collect();
        SourceHash {
            table,
            groups: groups.into_boxed_slice(),
        }
    }

    /// The owner table: for every slot, the index (into the backend list
    /// given to [`SourceHash::new`]) of the backend that slot's clients go
    /// to first. Public for tests that compare tables (tests/properties.rs).
    pub fn owners(&self) -> &[u32] {
        &self.table
    }

    /// Every eligible backend for a slot, best first.
    fn ranking(&self, slot: usize) -> Vec<usize> {
        let seed = slot_seed(slot);
        let mut scored: Vec<(f64, u64, usize)> = self
            .groups
            .iter()
            .flat_map(|g| {
                g.members.iter().map(move |&(i, key)| {
                    let h = mix64(key ^ seed);
                    (score(g.weight, h), h, i)
                })
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        scored.into_iter().map(|(_, _, i)| i).collect()
    }
}

fn slot_of(client: IpAddr) -> usize {
    (hash_ip(client) >> (64 - SLOTS.trailing_zeros())) as usize
}

fn slot_seed(slot: usize) -> u64 {
    mix64(slot as u64 ^ 0x5bd1_e995_0000_0000)
}

/// The highest-scoring backend for a slot. Within one weight group the largest
/// hash has the largest score, so the logarithm is taken once per group.
fn best(groups: &[Group], seed: u64) -> usize {
    let mut best: Option<(f64, u64, usize)> = None;
    for g in groups {
        let (h, i) = g
            .members
            .iter()
            .map(|&(i, key)| (mix64(key ^ seed), i))
            .max()
            .expect("groups are never empty");
        let s = if groups.len() == 1 {
            0.0
        } else {
            score(g.weight, h)
        };
        if best.is_none_or(|(bs, bh, _)| s > bs || (s == bs && h > bh)) {
            best = Some((s, h, i));
        }
    }
    best.map(|(_, _, i)| i)
        .expect("at least one eligible backend")
}

/// Weighted rendezvous score: `weight / -ln(u)`, `u` uniform in (0, 1).
fn score(weight: f64, hash: u64) -> f64 {
    let u = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

impl Scheduler for SourceHash {
    fn next(&self, client: IpAddr, cursor: &mut Cursor, _tried: &Tried) -> Option<usize> {
        if cursor.step == 0 {
            cursor.pos = slot_of(client);
            return Some(self.table[cursor.pos] as usize);
        }
        // Retries are rare: rank the slot's backends on demand. Rank 0 is the
        // table's owner, already tried.
        self.ranking(cursor.pos).get(cursor.step).copied()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::Pool;
    use super::super::test_support::backends;
    use super::*;
    use crate::config::Algorithm;

    /// 100k distinct synthetic client addresses.
    fn clients() -> impl Iterator<Item = IpAddr> {
        (0..100_000u32).map(|i| IpAddr::from((0x0a00_0000 + i * 7).to_be_bytes()))
    }

    fn owner_names(pool: &Pool) -> Vec<Arc<str>> {
        clients()
            .map(|ip| pool.candidates(ip).next().unwrap().name.clone())
            .collect()
    }

    #[test]
    fn removing_one_of_ten_moves_only_its_clients() {
        let all = backends(&[1; 10]);
        let before = owner_names(&Pool::new(Algorithm::Source, all.clone()));
        let nine: Vec<_> = all.iter().filter(|b| &*b.name != "b3").cloned().collect();
        let after = owner_names(&Pool::new(Algorithm::Source, nine));
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if &**b == "b3" {
                moved += 1;
                assert_ne!(&**a, "b3");
            } else {
                assert_eq!(b, a, "a client of {b} moved");
            }
        }
        // b3 held about a tenth of the clients.
        assert!((8_000..12_000).contains(&moved), "moved {moved}");
    }

    #[test]
    fn tables_agree_whatever_the_order_of_backends() {
        let list = backends(&[1, 2, 1, 1, 3]);
        let mut reversed = list.clone();
        reversed.reverse();
        let a = owner_names(&Pool::new(Algorithm::Source, list));
        let b = owner_names(&Pool::new(Algorithm::Source, reversed));
        assert_eq!(a, b);
    }

    #[test]
    fn shares_follow_weights() {
        let pool = Pool::new(Algorithm::Source, backends(&[1, 1, 2]));
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for name in owner_names(&pool) {
            *counts.entry(name).or_default() += 1;
        }
        let share = |n: &str| counts[n] as f64 / 100_000.0;
        assert!((share("b2") - 0.5).abs() < 0.03, "{counts:?}");
        assert!((share("b0") - 0.25).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn retries_follow_the_rendezvous_order() {
        let pool = Pool::new(Algorithm::Source, backends(&[1, 1, 1, 1]));
        let ip: IpAddr = "198.51.100.20".parse().unwrap();
        let order: Vec<_> = pool.candidates(ip).map(|b| b.name.clone()).collect();
        assert_eq!(order.len(), 4);
        // The second choice is where this client goes if its first is removed.
        let without_first: Vec<_> = pool
            .backends
            .iter()
            .filter(|b| b.name != order[0])
            .cloned()
            .collect();
        let pool2 = Pool::new(Algorithm::Source, without_first);
        assert_eq!(pool2.candidates(ip).next().unwrap().name, order[1]);
    }
}
