//! Cost of loading and validating a config (what `check` and every reload
//! pay before anything changes): a 20-listener, 1000-backend file.
//!
//! `cargo bench --bench config`

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};

fn big_config() -> String {
    let mut s = String::from("[global]\nshutdown_timeout = \"30s\"\n");
    for l in 0..20 {
        let _ = write!(
            s,
            "[[listener]]\nname = \"l{l}\"\nbind = \"127.0.0.1:{}\"\nalgorithm = \"leastconn\"\n",
            20_000 + l
        );
        for b in 0..50 {
            let _ = write!(
                s,
                "[[listener.backend]]\nname = \"b{b}\"\naddress = \"10.1.{l}.{}:5432\"\nweight = {}\n",
                b + 1,
                1 + b % 4
            );
        }
    }
    s
}

fn load(c: &mut Criterion) {
    let text = big_config();
    c.bench_function("load_20x50", |b| {
        b.iter(|| switchyard::config::load_str(black_box(&text), Path::new("bench.toml")).unwrap())
    });
}

criterion_group!(benches, load);
criterion_main!(benches);
