//! `cunorm bench`: CUDA timings of every op × dtype × memory format × stage over the standard
//! shapes, with effective bandwidth (minimum bytes: forward reads x and writes y, backward
//! reads x and dy and writes dx) as a percentage of a device-to-device copy measured in the
//! same run. Each case: warm-up runs, then the median of timed runs (CUDA events), with L2
//! flushed before every timed run (a kernel reading 4× L2: no dirty lines left to write back). With `--traffic` (on the fake driver's traffic build) each
//! stage runs once and its counted DRAM traffic is reported instead (see `traffic.rs`).

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};

use cunorm::cuda::{CudaDevice, L2Flush};
use cunorm::functional as F;
use cunorm::Device;
use cunorm::Result;
use cunorm::{bf16, f16};
use cunorm::{DType, Element};
use cunorm::{MemoryFormat, Tensor};

use crate::traffic::{self, Traffic};

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
    /// Minimum bytes: forward reads x and writes y, backward reads x and dy and writes dx.
    pub min_bytes: f64,
    /// The counted traffic (`--traffic`), and the standard shape `shape` was scaled from.
    pub traffic: Option<(Traffic, Option<Vec<usize>>)>,
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
    /// Only these standard shapes, as `1024x65536` (all when empty).
    pub shapes: Vec<String>,
    /// Count traffic on the fake driver instead of timing: each stage once, shapes scaled down
    /// along N to at most this many elements.
    pub traffic: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            warmup: 3,
            reps: 20,
            ops: Vec::new(),
            quick: false,
            shapes: Vec::new(),
            traffic: None,
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
    flush: L2Flush,
    /// `--traffic`: the fake driver's counter, and the counts of the last stage run.
    counter: Option<traffic::Counter>,
    last: Option<Traffic>,
}

impl Timer<'_> {
    /// Median milliseconds of `f` over `reps` runs after `warmup`, L2 flushed before each. With
    /// a traffic counter: `f` once, its traffic kept in `last`, and 0 ms.
    fn median(
        &mut self,
        warmup: usize,
        reps: usize,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<f64> {
        if let Some(c) = &self.counter {
            self.dev.synchronize()?;
            c.take();
            f()?;
            self.dev.synchronize()?;
            self.last = Some(c.take());
            return Ok(0.0);
        }
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
            self.flush.run()?;
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
    scaled_from: Option<&[usize]>,
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
    let mut push = |stage: &'static str, ms: f64, moved: f64, traffic: Option<Traffic>| {
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
            min_bytes: moved,
            traffic: traffic.map(|tr| (tr, scaled_from.map(<[usize]>::to_vec))),
        });
    };
    let (wu, reps) = (o.warmup, o.reps);
    // One row: `stage` timed (or counted) over `$e`, with `$moved` minimum bytes.
    macro_rules! rec {
        ($stage:expr, $e:expr, $moved:expr $(,)?) => {{
            let ms = t.median(wu, reps, &mut || {
                $e;
                Ok(())
            })?;
            let counted = t.last.take();
            push($stage, ms, $moved, counted);
        }};
    }
    match op {
        "layer_norm" => {
            let s = F::layer_norm(&x, &[last], Some(&w), Some(&b), 1e-5)?.stats;
            rec!(
                "forward",
                (F::layer_norm(&x, &[last], Some(&w), Some(&b), 1e-5)?),
                2.0 * bytes,
            );
            rec!(
                "backward",
                (F::layer_norm_backward(&dy, &x, &[last], Some(&w), true, &s)?),
                3.0 * bytes,
            );
        }
        "rms_norm" => {
            let s = F::rms_norm(&x, &[last], Some(&w), None)?.stats;
            rec!(
                "forward",
                (F::rms_norm(&x, &[last], Some(&w), None)?),
                2.0 * bytes,
            );
            rec!(
                "backward",
                (F::rms_norm_backward(&dy, &x, &[last], Some(&w), &s)?),
                3.0 * bytes,
            );
        }
        "group_norm" => {
            let s = F::group_norm(&x, 32, Some(&w), Some(&b), 1e-5)?.stats;
            rec!(
                "forward",
                (F::group_norm(&x, 32, Some(&w), Some(&b), 1e-5)?),
                2.0 * bytes,
            );
            rec!(
                "backward",
                (F::group_norm_backward(&dy, &x, 32, Some(&w), &s)?),
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
            rec!(
                "forward",
                fwd(
                    &x,
                    track.then_some(&mut tm),
                    track.then_some(&mut tv),
                    Some(&w),
                    Some(&b),
                    true,
                    0.1,
                    1e-5
                )?,
                2.0 * bytes
            );
            rec!(
                "eval",
                fwd(
                    &x,
                    Some(&mut rm),
                    Some(&mut rv),
                    Some(&w),
                    Some(&b),
                    false,
                    0.1,
                    1e-5
                )?,
                2.0 * bytes
            );
            rec!("backward", bwd(&dy, &x, Some(&w), &s)?, 3.0 * bytes);
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
    let counter = match o.traffic {
        Some(_) => Some(traffic::Counter::open()?),
        None => None,
    };
    let mut t = Timer {
        dev,
        flush: L2Flush::new(dev, if counter.is_some() { 16 } else { 4 * l2 })?,
        counter: None,
        last: None,
    };
    // No copy reference when counting traffic (its rows report ratios to minimum bytes).
    let copy = match counter {
        Some(c) => {
            t.counter = Some(c);
            f64::NAN
        }
        None => copy_gbps(dev, &mut t)?,
    };
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (op, shape) in standard_cases() {
        if !o.ops.is_empty() && !o.ops.iter().any(|x| x == op) {
            continue;
        }
        if o.quick && !seen.insert(op) {
            continue;
        }
        let name = shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x");
        if !o.shapes.is_empty() && !o.shapes.contains(&name) {
            continue;
        }
        let formats: &[MemoryFormat] = if matches!(op, "layer_norm" | "rms_norm") {
            &[MemoryFormat::Contiguous]
        } else {
            &[MemoryFormat::Contiguous, MemoryFormat::ChannelsLast]
        };
        let small = o.traffic.and_then(|cap| traffic::scaled(&shape, cap));
        let (run_shape, from) = match &small {
            Some(s) => (s.as_slice(), Some(shape.as_slice())),
            None => (shape.as_slice(), None),
        };
        for &fmt in formats {
            let (s, r) = (run_shape, &mut rows);
            bench_case::<f32>(dev, &mut t, op, s, fmt, copy, o, from, r)?;
            bench_case::<f16>(dev, &mut t, op, s, fmt, copy, o, from, r)?;
            bench_case::<bf16>(dev, &mut t, op, s, fmt, copy, o, from, r)?;
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

/// The rows of a `--traffic` run as a Markdown table: launches, counted bytes / minimum bytes
/// (the traffic ratio) and the most accesses one thread made.
pub fn traffic_table(device: &str, rows: &[BenchRow]) -> String {
    let mut s = format!(
        "device: {device}; traffic counted on the fake CUDA driver (a model of DRAM traffic \
         with no cache reuse for buffers > 1 MiB, not a GPU measurement)\n\n| op | dtype | \
         format | shape | stage | launches | counted MB | minimum MB | ratio | max accesses per \
         thread |\n|---|---|---|---|---|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let Some((tr, from)) = &r.traffic else {
            continue;
        };
        let shape = match from {
            Some(f) => format!("{:?} (of {:?})", r.shape, f),
            None => format!("{:?}", r.shape),
        };
        let counted = (tr.loaded + tr.stored) as f64;
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.3} | {} |\n",
            r.op,
            r.dtype.name(),
            r.format.name(),
            shape,
            r.stage,
            tr.launches,
            counted / 1e6,
            r.min_bytes / 1e6,
            counted / r.min_bytes,
            tr.max_thread
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
            "min_bytes": r.min_bytes,
            "traffic": r.traffic.as_ref().map(|(t, from)| serde_json::json!({
                "launches": t.launches, "loaded": t.loaded, "stored": t.stored,
                "max_thread_accesses": t.max_thread, "scaled_from": from,
                "ratio": (t.loaded + t.stored) as f64 / r.min_bytes,
            })),
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
            min_bytes: 3.0 * 2.0 * (32 * 512 * 64 * 64) as f64,
            traffic: None,
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

    /// A traffic row reports counted / minimum bytes and the shape it was scaled from.
    #[test]
    fn traffic_rows() {
        assert_eq!(
            traffic::scaled(&[1024, 65536], 1 << 20),
            Some(vec![16, 65536])
        );
        assert_eq!(traffic::scaled(&[8, 4, 4], 1 << 20), None);
        // Never below MIN_CAP elements (the tensors stay above the 1 MiB counting threshold).
        assert_eq!(
            traffic::scaled(&[65536, 128], 1 << 16),
            Some(vec![8192, 128])
        );
        // A sample larger than the cap keeps one sample.
        assert_eq!(
            traffic::scaled(&[16, 64, 256, 256], 1 << 20),
            Some(vec![1, 64, 256, 256])
        );
        let t = Traffic {
            launches: 2,
            loaded: 300,
            stored: 100,
            max_thread: 7,
        };
        let row = BenchRow {
            op: "layer_norm",
            dtype: DType::F32,
            format: MemoryFormat::Contiguous,
            shape: vec![16, 65536],
            stage: "forward",
            ms: 0.0,
            gbps: 0.0,
            pct_copy: 0.0,
            torch_ms: None,
            min_bytes: 200.0,
            traffic: Some((t, Some(vec![1024, 65536]))),
        };
        let s = traffic_table("test", &[row]);
        assert!(s.contains("[16, 65536] (of [1024, 65536])"), "{s}");
        assert!(s.contains("| 2 | 0.00 | 0.00 | 2.000 | 7 |"), "{s}");
    }
}
