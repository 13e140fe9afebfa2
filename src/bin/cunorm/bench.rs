//! `cunorm bench`: CUDA timings of every op × dtype × memory format × stage over the standard
//! shapes, with effective bandwidth (minimum bytes: forward reads x and writes y, backward
//! reads x and dy and writes dx) as a percentage of a device-to-device copy measured in the
//! same run. Each case: warm-up runs, then the median of timed runs (CUDA events), with L2
//! flushed before every timed run.

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};

use cunorm::cuda::CudaDevice;
use cunorm::functional as F;
use cunorm::Device;
use cunorm::Result;
use cunorm::{bf16, f16};
use cunorm::{DType, Element};
use cunorm::{MemoryFormat, Tensor};

/// A driver error as cunorm's error, saying what the bench was doing.
fn driver_err(context: &str, e: cudarc::driver::DriverError) -> cunorm::Error {
    cunorm::Error::Cuda {
        context: context.to_string(),
        message: e.to_string(),
    }
}

/// One measured case.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// `layer_norm`, `rms_norm`, `group_norm`, `batch_norm`, `instance_norm`.
    pub op: &'static str,
    /// Input dtype.
    pub dtype: DType,
    /// Memory format.
    pub format: MemoryFormat,
    /// Input shape.
    pub shape: Vec<usize>,
    /// `forward` (training statistics), `eval` or `backward`.
    pub stage: &'static str,
    /// Median time in milliseconds.
    pub ms: f64,
    /// Minimum bytes moved / time, GB/s.
    pub gbps: f64,
    /// `gbps` as a percentage of the measured device-to-device copy bandwidth.
    pub pct_copy: f64,
    /// PyTorch's median time for the same case, when a comparison file was given.
    pub torch_ms: Option<f64>,
}

impl BenchRow {
    /// The key shared with `benches/torch_compare.py`'s JSON.
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}|{:?}|{}",
            self.op,
            self.dtype.name(),
            self.format.name(),
            self.shape,
            self.stage
        )
    }
}

/// Options of a run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Untimed runs before timing.
    pub warmup: usize,
    /// Timed runs (the median is reported).
    pub reps: usize,
    /// Only these ops (all when empty).
    pub ops: Vec<String>,
    /// Only the first shape of each op.
    pub quick: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            warmup: 3,
            reps: 20,
            ops: Vec::new(),
            quick: false,
        }
    }
}

/// The standard shapes: (op, shape, groups or normalized length, formats).
pub fn standard_cases() -> Vec<(&'static str, Vec<usize>)> {
    let mut v = Vec::new();
    for (r, c) in [
        (65536, 128),
        (16384, 1024),
        (4096, 4096),
        (8192, 8192),
        (1024, 65536),
    ] {
        v.push(("layer_norm", vec![r, c]));
        v.push(("rms_norm", vec![r, c]));
    }
    v.push(("group_norm", vec![32, 512, 64, 64]));
    v.push(("group_norm", vec![8, 256, 128, 128]));
    v.push(("batch_norm", vec![64, 256, 56, 56]));
    v.push(("batch_norm", vec![256, 64, 112, 112]));
    v.push(("instance_norm", vec![16, 64, 256, 256]));
    v.push(("instance_norm", vec![64, 256, 32, 32]));
    v
}

struct Timer<'a> {
    dev: &'a CudaDevice,
    flush: cudarc::driver::CudaSlice<u8>,
}

impl Timer<'_> {
    /// Median milliseconds of `f` over `reps` runs after `warmup`, L2 flushed before each.
    fn median(
        &mut self,
        warmup: usize,
        reps: usize,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let ctx = self.dev.context();
        let stream = self.dev.stream();
        // Events and the result vector are made before the timed window, not inside it.
        let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx
            .new_event(flags)
            .map_err(|e| driver_err("creating an event", e))?;
        let end = ctx
            .new_event(flags)
            .map_err(|e| driver_err("creating an event", e))?;
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            stream
                .memset_zeros(&mut self.flush)
                .map_err(|e| driver_err("flushing L2", e))?;
            start
                .record(stream)
                .map_err(|e| driver_err("recording an event", e))?;
            f()?;
            end.record(stream)
                .map_err(|e| driver_err("recording an event", e))?;
            times.push(
                start
                    .elapsed_ms(&end)
                    .map_err(|e| driver_err("timing", e))? as f64,
            );
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Device-to-device copy bandwidth (GB/s, read + write) of a 1 GiB buffer.
fn copy_gbps(dev: &CudaDevice, t: &mut Timer<'_>) -> Result<f64> {
    let n = 1usize << 30;
    let src = dev.zeros::<u8>(n)?;
    let mut dst = dev.zeros::<u8>(n)?;
    let stream = dev.stream().clone();
    let ms = t.median(2, 10, &mut || {
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(|e| driver_err("copying", e))
    })?;
    Ok(2.0 * n as f64 / (ms * 1e-3) / 1e9)
}

fn input<T: Element>(
    shape: &[usize],
    format: MemoryFormat,
    dev: &Device,
    seed: u32,
) -> Result<Tensor<T>> {
    let n: usize = shape.iter().product();
    // A cheap deterministic pattern in [-2, 2): content does not affect timing.
    let v: Vec<T> = (0..n)
        .map(|i| {
            T::from_f32(
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32
                    / (1u32 << 22) as f32
                    - 2.0,
            )
        })
        .collect();
    Tensor::from_vec(v, shape)?
        .to_format(format)?
        .to_device(dev)
}

#[allow(clippy::too_many_arguments)]
fn bench_case<T: Element>(
    dev: &CudaDevice,
    t: &mut Timer<'_>,
    op: &'static str,
    shape: &[usize],
    format: MemoryFormat,
    copy: f64,
    o: &BenchOptions,
    rows: &mut Vec<BenchRow>,
) -> Result<()> {
    let d = Device::Cuda(dev.clone());
    let x = input::<T>(shape, format, &d, 1)?;
    let dy = input::<T>(shape, format, &d, 2)?;
    let c = shape[1];
    let last = *shape.last().unwrap_or(&1);
    let pc = if matches!(op, "layer_norm" | "rms_norm") {
        last
    } else {
        c
    };
    let w = Tensor::full(&[pc], 1.0f32)?.to_device(&d)?;
    let b = Tensor::full(&[pc], 0.0f32)?.to_device(&d)?;
    let mut rm = Tensor::full(&[c], 0.0f32)?.to_device(&d)?;
    let mut rv = Tensor::full(&[c], 1.0f32)?.to_device(&d)?;
    let numel: usize = shape.iter().product();
    let bytes = (numel * T::DTYPE.size()) as f64;
    let mut push = |stage: &'static str, ms: f64, moved: f64| {
        let gbps = moved / (ms * 1e-3) / 1e9;
        rows.push(BenchRow {
            op,
            dtype: T::DTYPE,
            format,
            shape: shape.to_vec(),
            stage,
            ms,
            gbps,
            pct_copy: 100.0 * gbps / copy,
            torch_ms: None,
        });
    };
    let (wu, reps) = (o.warmup, o.reps);
    macro_rules! time {
        ($e:expr) => {
            t.median(wu, reps, &mut || {
                $e;
                Ok(())
            })?
        };
    }
    match op {
        "layer_norm" => {
            let s = F::layer_norm(&x, &[last], Some(&w), Some(&b), 1e-5)?.stats;
            push(
                "forward",
                time!(F::layer_norm(&x, &[last], Some(&w), Some(&b), 1e-5)?),
                2.0 * bytes,
            );
            push(
                "backward",
                time!(F::layer_norm_backward(
                    &dy,
                    &x,
                    &[last],
                    Some(&w),
                    true,
                    &s
                )?),
                3.0 * bytes,
            );
        }
        "rms_norm" => {
            let s = F::rms_norm(&x, &[last], Some(&w), None)?.stats;
            push(
                "forward",
                time!(F::rms_norm(&x, &[last], Some(&w), None)?),
                2.0 * bytes,
            );
            push(
                "backward",
                time!(F::rms_norm_backward(&dy, &x, &[last], Some(&w), &s)?),
                3.0 * bytes,
            );
        }
        "group_norm" => {
            let s = F::group_norm(&x, 32, Some(&w), Some(&b), 1e-5)?.stats;
            push(
                "forward",
                time!(F::group_norm(&x, 32, Some(&w), Some(&b), 1e-5)?),
                2.0 * bytes,
            );
            push(
                "backward",
                time!(F::group_norm_backward(&dy, &x, 32, Some(&w), &s)?),
                3.0 * bytes,
            );
        }
        _ => {
            // BatchNorm and InstanceNorm share the functional signature. As usually configured,
            // BatchNorm tracks running statistics in training and InstanceNorm does not (the
            // same calls benches/torch_compare.py times); both use them in eval.
            type Fwd<T> = fn(
                &Tensor<T>,
                Option<&mut Tensor<f32>>,
                Option<&mut Tensor<f32>>,
                Option<&dyn cunorm::Param>,
                Option<&dyn cunorm::Param>,
                bool,
                f64,
                f64,
            ) -> Result<cunorm::NormOutput<T>>;
            type Bwd<T> = fn(
                &Tensor<T>,
                &Tensor<T>,
                Option<&dyn cunorm::Param>,
                &cunorm::SavedStats,
            ) -> Result<cunorm::Gradients<T>>;
            let (fwd, bwd, track): (Fwd<T>, Bwd<T>, bool) = if op == "batch_norm" {
                (F::batch_norm::<T>, F::batch_norm_backward::<T>, true)
            } else {
                (F::instance_norm::<T>, F::instance_norm_backward::<T>, false)
            };
            let s = fwd(&x, None, None, Some(&w), Some(&b), true, 0.1, 1e-5)?.stats;
            let (mut tm, mut tv) = (rm.clone(), rv.clone());
            let train_ms = time!(fwd(
                &x,
                track.then_some(&mut tm),
                track.then_some(&mut tv),
                Some(&w),
                Some(&b),
                true,
                0.1,
                1e-5
            )?);
            push("forward", train_ms, 2.0 * bytes);
            let eval_ms = time!(fwd(
                &x,
                Some(&mut rm),
                Some(&mut rv),
                Some(&w),
                Some(&b),
                false,
                0.1,
                1e-5
            )?);
            push("eval", eval_ms, 2.0 * bytes);
            push("backward", time!(bwd(&dy, &x, Some(&w), &s)?), 3.0 * bytes);
        }
    }
    Ok(())
}

/// Runs the benchmark; returns the copy bandwidth (GB/s) and the rows.
pub fn run(dev: &CudaDevice, o: &BenchOptions) -> Result<(f64, Vec<BenchRow>)> {
    // SAFETY: this process queues all its work on cunorm's one stream, so cudarc's per-buffer
    // multi-stream events (a record and a wait around every launch) only add host time to what
    // is measured; buffers allocated from here on skip them.
    unsafe { dev.context().disable_event_tracking() };
    let l2 = dev
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(|e| driver_err("reading the L2 size", e))?
        .max(1 << 20) as usize;
    let mut t = Timer {
        dev,
        flush: dev.zeros::<u8>(4 * l2)?,
    };
    let copy = copy_gbps(dev, &mut t)?;
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (op, shape) in standard_cases() {
        if !o.ops.is_empty() && !o.ops.iter().any(|x| x == op) {
            continue;
        }
        if o.quick && !seen.insert(op) {
            continue;
        }
        let formats: &[MemoryFormat] = if matches!(op, "layer_norm" | "rms_norm") {
            &[MemoryFormat::Contiguous]
        } else {
            &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]
        };
        for &fmt in formats {
            bench_case::<f32>(dev, &mut t, op, &shape, fmt, copy, o, &mut rows)?;
            bench_case::<f16>(dev, &mut t, op, &shape, fmt, copy, o, &mut rows)?;
            bench_case::<bf16>(dev, &mut t, op, &shape, fmt, copy, o, &mut rows)?;
        }
    }
    Ok((copy, rows))
}

/// Fills `torch_ms` from `benches/torch_compare.py`'s JSON (`{"results": [{"key", "ms"}...]}`).
pub fn attach_torch(rows: &mut [BenchRow], json: &serde_json::Value) {
    let Some(list) = json["results"].as_array() else {
        return;
    };
    let map: std::collections::HashMap<&str, f64> = list
        .iter()
        .filter_map(|r| Some((r["key"].as_str()?, r["ms"].as_f64()?)))
        .collect();
    for r in rows {
        r.torch_ms = map.get(r.key().as_str()).copied();
    }
}

/// The rows as a Markdown table.
pub fn table(copy: f64, device: &str, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "device: {device}; device-to-device copy: {copy:.0} GB/s\n\n| op | dtype | format | shape | stage | ms | GB/s | % of copy | PyTorch ms | PyTorch / cunorm |\n|---|---|---|---|---|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let (tm, ratio) = match r.torch_ms {
            Some(t) => (format!("{t:.4}"), format!("{:.2}", t / r.ms)),
            None => ("-".into(), "-".into()),
        };
        s += &format!(
            "| {} | {} | {} | {:?} | {} | {:.4} | {:.0} | {:.1} | {} | {} |\n",
            r.op,
            r.dtype.name(),
            r.format.name(),
            r.shape,
            r.stage,
            r.ms,
            r.gbps,
            r.pct_copy,
            tm,
            ratio
        );
    }
    s
}

/// The rows as JSON.
pub fn to_json(copy: f64, device: &str, rows: &[BenchRow]) -> serde_json::Value {
    serde_json::json!({
        "device": device,
        "copy_gbps": copy,
        "results": rows.iter().map(|r| serde_json::json!({
            "key": r.key(), "op": r.op, "dtype": r.dtype.name(), "format": r.format.name(),
            "shape": r.shape, "stage": r.stage, "ms": r.ms, "gbps": r.gbps, "pct_copy": r.pct_copy,
            "torch_ms": r.torch_ms, "ratio": r.torch_ms.map(|t| t / r.ms),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys must match what benches/torch_compare.py writes: f"{op}|{dtype}|{fmt}|{list(shape)}|{stage}".
    #[test]
    fn torch_keys_match() {
        let mut rows = vec![BenchRow {
            op: "group_norm",
            dtype: DType::BF16,
            format: MemoryFormat::ChannelsLast,
            shape: vec![32, 512, 64, 64],
            stage: "backward",
            ms: 0.5,
            gbps: 1.0,
            pct_copy: 1.0,
            torch_ms: None,
        }];
        let json = serde_json::json!({"results": [
            {"key": "group_norm|bf16|nhwc|[32, 512, 64, 64]|backward", "ms": 1.5},
            {"key": "group_norm|bf16|nhwc|[32, 512, 64, 64]|forward", "ms": 9.0},
        ]});
        attach_torch(&mut rows, &json);
        assert_eq!(rows[0].torch_ms, Some(1.5));
        assert!(table(3000.0, "test", &rows).contains("| 3.00 |"));
        assert_eq!(standard_cases().len(), 16);
    }
}
