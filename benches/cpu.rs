//! CPU forward benchmarks of the standard shapes (f32), at 1 and 2 threads, plus backward.
//! `cargo bench --bench cpu`; PyTorch's side: `python3 benches/torch_cpu.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use cunorm::functional as F;
use cunorm::Tensor;

fn input(shape: &[usize]) -> Tensor<f32> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u64 * 2654435761) % 1000) as f32 * 0.002 - 1.0)
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

type Case = (&'static str, Vec<usize>, fn(&Tensor<f32>) -> Tensor<f32>);

fn cases() -> Vec<Case> {
    vec![
        ("layer_norm_4096x1024", vec![4096, 1024], |x| {
            F::layer_norm(x, &[1024], None, None, 1e-5).unwrap().output
        }),
        (
            "batch_norm2d_train_32x64x56x56",
            vec![32, 64, 56, 56],
            |x| {
                F::batch_norm(x, None, None, None, None, true, 0.1, 1e-5)
                    .unwrap()
                    .output
            },
        ),
        ("group_norm32_8x256x64x64", vec![8, 256, 64, 64], |x| {
            F::group_norm(x, 32, None, None, 1e-5).unwrap().output
        }),
        ("instance_norm2d_8x64x64x64", vec![8, 64, 64, 64], |x| {
            F::instance_norm(x, None, None, None, None, true, 0.1, 1e-5)
                .unwrap()
                .output
        }),
        ("rms_norm_4096x1024", vec![4096, 1024], |x| {
            F::rms_norm(x, &[1024], None, None).unwrap().output
        }),
    ]
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_forward_f32");
    group.sample_size(20);
    for (name, shape, f) in cases() {
        let x = input(&shape);
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            group.bench_with_input(BenchmarkId::new(name, format!("{threads}t")), &x, |b, x| {
                pool.install(|| b.iter(|| f(x)))
            });
        }
    }
    group.finish();
}

fn backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu_backward_f32");
    group.sample_size(10);
    let x = input(&[4096, 1024]);
    let o = F::layer_norm(&x, &[1024], None, None, 1e-5).unwrap();
    group.bench_function("layer_norm_4096x1024", |b| {
        b.iter(|| F::layer_norm_backward(&x, &x, &[1024], None, true, &o.stats).unwrap())
    });
    let x = input(&[8, 256, 64, 64]);
    let o = F::group_norm(&x, 32, None, None, 1e-5).unwrap();
    group.bench_function("group_norm32_8x256x64x64", |b| {
        b.iter(|| F::group_norm_backward(&x, &x, 32, None, &o.stats).unwrap())
    });
    group.finish();
}

criterion_group!(benches, forward, backward);
criterion_main!(benches);
