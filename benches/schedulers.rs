//! Cost of one scheduling decision (the first candidate for a new connection)
//! for each algorithm at 3, 100 and 1000 backends, and of rebuilding a pool
//! (what a reload or a health flip pays), and of one connection's open and
//! close on a backend (what keeping least-connection's load tree current adds
//! to every connection).
//!
//! `cargo bench --bench schedulers`

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard::backend::{Backend, BackendState};
use switchyard::balancer::Pool;
use switchyard::config::{Algorithm, BackendConfig};

fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:5432", i / 250, i % 250 + 1);
            let state = Arc::new(BackendState::default());
            // Uneven load and weights, so least-connection has work to do.
            for _ in 0..(i * 7 % 13) {
                std::mem::forget(state.enter());
            }
            Arc::new(Backend::new(
                &BackendConfig {
                    name: format!("backend-{i}").into(),
                    address: addr.clone(),
                    addr: addr.parse().unwrap(),
                    weight: 1 + (i % 3) as u32,
                    backup: false,
                    max_connections: None,
                    discovered_from: None,
                },
                state,
            ))
        })
        .collect()
}

const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Roundrobin,
    Algorithm::Leastconn,
    Algorithm::Source,
];

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for alg in ALGORITHMS {
        for n in [3, 100, 1000] {
            let pool = Pool::new(alg, backends(n));
            let clients: Vec<IpAddr> = (0..1024u32)
                .map(|i| IpAddr::from(i.wrapping_mul(2_654_435_761).to_be_bytes()))
                .collect();
            let mut k = 0;
            group.bench_with_input(BenchmarkId::new(alg.as_str(), n), &pool, |b, pool| {
                b.iter(|| {
                    k = (k + 1) & 1023;
                    black_box(pool.candidates(black_box(clients[k])).next())
                })
            });
        }
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    for alg in ALGORITHMS {
        for n in [3, 100, 1000] {
            let list = backends(n);
            group.bench_with_input(BenchmarkId::new(alg.as_str(), n), &list, |b, list| {
                b.iter(|| black_box(Pool::new(alg, list.clone())))
            });
        }
    }
    group.finish();
}

fn open_close(c: &mut Criterion) {
    let mut group = c.benchmark_group("open_close");
    for alg in ALGORITHMS {
        for n in [3, 1000] {
            let pool = Pool::new(alg, backends(n));
            let mut k = 0;
            group.bench_with_input(BenchmarkId::new(alg.as_str(), n), &pool, |b, pool| {
                b.iter(|| {
                    k = (k + 1) % n;
                    drop(black_box(pool.backends[k].state.enter()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick, build, open_close);
criterion_main!(benches);
