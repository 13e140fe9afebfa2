//! CUDA benchmarks through criterion (`cargo bench --bench cuda`): each iteration is timed
//! with CUDA events via `iter_custom`, so the HTML report shows GPU time. Without a usable GPU
//! it prints why and measures nothing. The full table with bandwidth and the PyTorch ratio is
//! `cunorm bench`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use cunorm::cuda::CudaDevice;
use cunorm::{bf16, functional as F, Device, Element, Tensor};

fn timed<T: Element>(c: &mut Criterion, dev: &CudaDevice, name: &str, shape: &[usize]) {
    let d = Device::Cuda(dev.clone());
    let n: usize = shape.iter().product();
    let cols = *shape.last().unwrap();
    let x = Tensor::from_vec(
        (0..n)
            .map(|i| T::from_f32((i % 97) as f32 / 50.0 - 1.0))
            .collect(),
        shape,
    )
    .unwrap()
    .to_device(&d)
    .unwrap();
    let mut g = c.benchmark_group(format!("cuda_{name}_{}", T::DTYPE.name()));
    g.throughput(Throughput::Bytes((2 * n * T::DTYPE.size()) as u64));
    g.bench_with_input(
        BenchmarkId::from_parameter(format!("{shape:?}")),
        &x,
        |b, x| {
            b.iter_custom(|iters| {
                let ctx = dev.context();
                let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
                let (start, end) = (ctx.new_event(flags).unwrap(), ctx.new_event(flags).unwrap());
                start.record(dev.stream()).unwrap();
                for _ in 0..iters {
                    let out = match name {
                        "layer_norm" => F::layer_norm(x, &[cols], None, None, 1e-5),
                        "rms_norm" => F::rms_norm(x, &[cols], None, None),
                        _ => F::group_norm(x, 32, None, None, 1e-5),
                    };
                    std::hint::black_box(out.unwrap());
                }
                end.record(dev.stream()).unwrap();
                Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 * 1e-3)
            })
        },
    );
    g.finish();
}

fn cuda(c: &mut Criterion) {
    let dev = match Device::cuda(0) {
        Ok(Device::Cuda(d)) => d,
        Ok(_) => return,
        Err(e) => {
            eprintln!("cuda benchmarks skipped: {e}");
            return;
        }
    };
    timed::<f32>(c, &dev, "layer_norm", &[16384, 1024]);
    timed::<bf16>(c, &dev, "layer_norm", &[16384, 1024]);
    timed::<bf16>(c, &dev, "rms_norm", &[4096, 4096]);
    timed::<f32>(c, &dev, "group_norm", &[8, 256, 128, 128]);
}

criterion_group!(benches, cuda);
criterion_main!(benches);
