//! CPU benchmarks of every case of `benches/cpu_cases.json` (the cases `benches/cpu_compare.py`
//! times against PyTorch): every op × {f32, bf16, f16} × {NCHW, NHWC} × {forward, backward}
//! on the standard CPU shapes plus small in-cache ones, timed as `cunorm cpu-bench` times them
//! (inputs and saved statistics made beforehand, outputs allocated inside the timing).
//!
//! The thread count is rayon's global pool, as for any program using cunorm:
//! `RAYON_NUM_THREADS=1 cargo bench --bench cpu` and `RAYON_NUM_THREADS=2 cargo bench --bench
//! cpu`; a filter picks cases, e.g. `cargo bench --bench cpu -- 'group_norm|bf16'`.

use criterion::{criterion_group, criterion_main, Criterion};

#[allow(dead_code)]
#[path = "../src/bin/cunorm/cpu_bench.rs"]
mod cpu_bench;

fn cases(c: &mut Criterion) {
    let list: serde_json::Value =
        serde_json::from_str(include_str!("cpu_cases.json")).expect("benches/cpu_cases.json");
    let cases = cpu_bench::parse_cases(&list).expect("benches/cpu_cases.json");
    let threads = rayon::current_num_threads();
    let mut group = c.benchmark_group(format!("cpu_{threads}t"));
    group.sample_size(10);
    for case in &cases {
        let mut call = cpu_bench::prepare(case).expect("case inputs");
        group.bench_function(case.key.as_str(), |b| b.iter(|| call().expect("op")));
    }
    group.finish();
}

criterion_group!(benches, cases);
criterion_main!(benches);
