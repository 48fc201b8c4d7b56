//! Picking a backend for a new connection.
//!
//! A [`Pool`] is an immutable snapshot: the listener's backends plus a
//! [`Scheduler`] built for the backends that may take new connections right
//! now. The control plane builds a new pool whenever that set changes (reload,
//! weight, later health and admin state) and publishes it with `ArcSwap`; the
//! data path only reads, with atomics and no locks.
//!
//! Selection yields [`Candidates`] in order of preference, so retrying a
//! failed connect is "take the next one" without re-running the algorithm, and
//! no backend is offered twice for the same client connection.

mod hash;
mod leastconn;
pub(crate) mod load_tree;
mod roundrobin;
mod source;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use hash::{hash_bytes, hash_ip, mix64};
pub use leastconn::LeastConn;
pub use roundrobin::RoundRobin;
pub use source::SourceHash;

use crate::backend::{Backend, Via};
use crate::config::Algorithm;

/// One scheduling algorithm, built over a fixed set of eligible backends.
///
/// Implementations return indices into the pool's backend list. They are
/// called first with a fresh [`Cursor`] and then again, with the same cursor,
/// each time the caller wants another candidate; they must eventually return
/// `None`, and should not return a backend already in `tried`.
pub trait Scheduler: Send + Sync + fmt::Debug {
    fn next(&self, client: IpAddr, cursor: &mut Cursor, tried: &Tried) -> Option<usize>;
}

/// Per-connection scheduling position, owned by [`Candidates`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    /// Algorithm-defined position (round-robin ticket, hash slot…).
    pub pos: usize,
    /// How many candidates were produced so far.
    pub step: usize,
}

/// Backends already offered for this connection.
#[derive(Debug, Default)]
pub struct Tried {
    first: Option<usize>,
    /// Only retries allocate.
    rest: Vec<usize>,
}

impl Tried {
    pub fn contains(&self, index: usize) -> bool {
        self.first == Some(index) || self.rest.contains(&index)
    }

    fn push(&mut self, index: usize) {
        if self.first.is_none() {
            self.first = Some(index);
        } else {
            self.rest.push(index);
        }
    }
}

/// An immutable view of one listener's backends and how to choose among them.
#[derive(Debug)]
pub struct Pool {
    /// Every configured backend, eligible or not, in config order.
    pub backends: Vec<Arc<Backend>>,
    /// Indices of the backends the scheduler may offer.
    eligible: Vec<usize>,
    scheduler: Box<dyn Scheduler>,
}

impl Pool {
    /// Build a pool whose scheduler considers only backends that can take new
    /// connections now: those the scheduler may offer ([`Via::Scheduler`]),
    /// and among those the non-backup ones, or the backups while no
    /// non-backup one is.
    pub fn new(algorithm: Algorithm, backends: Vec<Arc<Backend>>) -> Pool {
        let usable = |backup: bool| -> Vec<usize> {
            (0..backends.len())
                .filter(|&i| backends[i].backup == backup && backends[i].admits(Via::Scheduler))
                .collect()
        };
        let mut eligible = usable(false);
        if eligible.is_empty() {
            eligible = usable(true);
        }
        for b in &backends {
            b.state.report_load_to(None);
        }
        let scheduler: Box<dyn Scheduler> = if eligible.is_empty() {
            Box::new(NoBackend)
        } else {
            match algorithm {
                Algorithm::Roundrobin => Box::new(RoundRobin::new(&backends, &eligible)),
                Algorithm::Leastconn => Box::new(LeastConn::new(&backends, &eligible)),
                Algorithm::Source => Box::new(SourceHash::new(&backends, &eligible)),
            }
        };
        Pool {
            backends,
            eligible,
            scheduler,
        }
    }

    /// The backends in rotation: those the scheduler may offer.
    pub fn in_rotation(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.eligible.iter().map(|&i| &self.backends[i])
    }

    /// Backends for a new connection from `client`, best first.
    pub fn candidates(&self, client: IpAddr) -> Candidates<'_> {
        Candidates {
            pool: self,
            client,
            cursor: Cursor::default(),
            tried: Tried::default(),
        }
    }
}

/// Candidates for one client connection, best first, each at most once.
pub struct Candidates<'a> {
    pool: &'a Pool,
    client: IpAddr,
    cursor: Cursor,
    tried: Tried,
}

impl<'a> Iterator for Candidates<'a> {
    type Item = &'a Arc<Backend>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let i = self
                .pool
                .scheduler
                .next(self.client, &mut self.cursor, &self.tried)?;
            self.cursor.step += 1;
            if !self.tried.contains(i) {
                self.tried.push(i);
                return Some(&self.pool.backends[i]);
            }
        }
    }
}

/// The scheduler of a pool with nothing to offer.
#[derive(Debug)]
struct NoBackend;

impl Scheduler for NoBackend {
    fn next(&self, _: IpAddr, _: &mut Cursor, _: &Tried) -> Option<usize> {
        None
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::backend::BackendState;
    use crate::config::BackendConfig;

    /// Backends named b0, b1, … with the given weights.
    pub fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = format!("127.0.0.1:{}", 10_000 + i);
                Arc::new(Backend::new(
                    &BackendConfig {
                        name: format!("b{i}").into(),
                        address: addr.clone(),
                        addr: addr.parse().unwrap(),
                        weight: w,
                        backup: false,
                        max_connections: None,
                        discovered_from: None,
                    },
                    Arc::new(BackendState::default()),
                ))
            })
            .collect()
    }

    /// First choice of `n` consecutive connections, as backend indices.
    pub fn picks(pool: &Pool, n: usize) -> Vec<usize> {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        (0..n)
            .map(|_| {
                let b = pool.candidates(ip).next().unwrap();
                pool.backends
                    .iter()
                    .position(|x| Arc::ptr_eq(x, b))
                    .unwrap()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn candidates_are_unique_and_exhaust_every_algorithm() {
        for alg in [
            Algorithm::Roundrobin,
            Algorithm::Leastconn,
            Algorithm::Source,
        ] {
            let pool = Pool::new(alg, backends(&[1, 2, 0, 3]));
            let ip: IpAddr = "192.0.2.7".parse().unwrap();
            let mut names: Vec<_> = pool.candidates(ip).map(|b| b.name.to_string()).collect();
            names.sort();
            assert_eq!(names, ["b0", "b1", "b3"], "{alg:?}");
        }
    }

    #[test]
    fn down_backends_are_skipped_and_backups_stand_in() {
        let mut list = backends(&[1, 1, 1]);
        Arc::get_mut(&mut list[2]).unwrap().config.backup = true;
        let names = |pool: &Pool| -> Vec<String> {
            let mut v: Vec<_> = pool
                .candidates("10.0.0.1".parse().unwrap())
                .map(|b| b.name.to_string())
                .collect();
            v.sort();
            v
        };
        let pool = Pool::new(Algorithm::Roundrobin, list.clone());
        assert_eq!(names(&pool), ["b0", "b1"]);
        list[0].state.set_up(false);
        assert_eq!(
            names(&Pool::new(Algorithm::Roundrobin, list.clone())),
            ["b1"]
        );
        list[1].state.set_up(false);
        assert_eq!(
            names(&Pool::new(Algorithm::Leastconn, list.clone())),
            ["b2"]
        );
        list[0].state.set_up(true);
        assert_eq!(names(&Pool::new(Algorithm::Source, list.clone())), ["b0"]);
    }

    #[test]
    fn zero_weight_only_means_no_candidate() {
        let pool = Pool::new(Algorithm::Roundrobin, backends(&[0, 0]));
        assert!(
            pool.candidates("10.0.0.1".parse().unwrap())
                .next()
                .is_none()
        );
    }
}
