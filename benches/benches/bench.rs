//! Criterion benchmarks of the engine's core paths on the in-memory and the
//! file backend, one group per area (see the modules of `qcow2_bench`).
//! Next to the times, the churn counters per operation are printed and saved
//! as `target/criterion/churn.json`.
//!
//! `cargo bench -p qcow2-bench` runs everything; `cargo bench -p qcow2-bench
//! -- skip` runs one area; `QCOW2_BENCH_DIR` moves the file-backend images.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use qcow2_bench::{all_scenarios, criterion_dir, Backend, ChurnLog, Sizes};
use std::cell::OnceCell;
use std::time::Duration;

/// Operations the churn counters are averaged over (reusable scenarios).
const CHURN_OPS: u64 = 8;

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let scenarios = all_scenarios(&Sizes::FULL).expect("bench templates");
    let mut log = ChurnLog::default();
    let mut areas: Vec<&str> = scenarios.iter().map(|s| s.area).collect();
    areas.dedup();
    for area in areas {
        let mut g = c.benchmark_group(area);
        for s in scenarios.iter().filter(|s| s.area == area) {
            g.throughput(Throughput::Elements(s.entries));
            if !s.reuse {
                // A fresh image per iteration: fewer, longer samples.
                g.sample_size(10);
            } else {
                g.sample_size(50);
            }
            for backend in Backend::ALL {
                let fixture = OnceCell::new();
                let log = &mut log;
                g.bench_function(BenchmarkId::new(s.name, backend.name()), |b| {
                    // Only reached when the filter selects this bench.
                    log.record_once(s, backend, if s.reuse { CHURN_OPS } else { 2 });
                    if s.reuse {
                        let fx = fixture.get_or_init(|| s.fixture(backend));
                        b.iter(|| s.run(&fx.image));
                    } else {
                        b.iter_batched(
                            || s.fixture(backend),
                            |fx| {
                                s.run(&fx.image);
                                fx // dropped outside the timing
                            },
                            BatchSize::PerIteration,
                        );
                    }
                });
            }
        }
        g.finish();
    }
    c.final_summary();
    if let Err(e) = log.finish(&criterion_dir()) {
        eprintln!("could not save churn.json: {e}");
    }
}
