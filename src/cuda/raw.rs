//! The launch layer over cudarc buffers, for code that already holds `CudaSlice`/`CudaView`s:
//! every function checks lengths (an `Err`, never a panic or an out-of-bounds launch), queues
//! its kernels on the device's stream and returns without synchronizing.
//!
//! Element type `T` is `f32`, `f16` or `bf16`; parameters, statistics and gradients of
//! parameters are `f32`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{driver_err, CudaDevice, Kernel};
use crate::dtype::Element;
use crate::error::{Error, Result};

const NULL: u64 = 0;

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(Error::Shape(format!(
            "cuda launch: {what} holds {got} elements but the call needs {want}; pass a larger buffer"
        )));
    }
    Ok(())
}

fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::Shape(format!(
            "cuda launch: {what} = {v} exceeds 2^31 − 1; split the input"
        ))
    })
}

fn grid(blocks: usize) -> Result<u32> {
    u32::try_from(blocks.max(1))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::Shape(format!(
                "cuda launch: {blocks} blocks exceed the grid limit; split the input"
            ))
        })
}

/// Pushes an optional f32 buffer, or a null pointer (the kernels treat null as "absent").
fn arg_or_null<'a, 'b: 'a, 'c: 'b>(b: &mut LaunchArgs<'a>, v: Option<&'b CudaView<'c, f32>>) {
    match v {
        Some(v) => b.arg(v),
        None => b.arg(&NULL),
    };
}

fn launch_err(e: cudarc::driver::DriverError) -> Error {
    driver_err("launching a kernel", e)
}

/// Threads per block for kernel `k`: `want` (rounded up to whole warps, at most 1024) capped by what
/// the kernel's register use allows on this device, so that a 1024-thread launch of a kernel
/// using more than 64 registers (65 536 per block) cannot fail with "too many resources".
fn block_threads(k: &Kernel, want: usize) -> u32 {
    let cap = (k.max_threads as usize) / 32 * 32;
    want.next_multiple_of(32).clamp(32, cap) as u32
}

fn pack<T: Element>() -> usize {
    16 / T::DTYPE.size()
}

// ---------------------------------------------------------------------------------------------
// LayerNorm / RMSNorm
// ---------------------------------------------------------------------------------------------

/// Shared memory a block uses without opting in.
const DEFAULT_SMEM: usize = 48 * 1024;

/// Launch configuration of the row forward kernel. The row stays on chip (as T) when it fits in
/// the device's opt-in shared memory next to the 384-byte reduction scratch; above 48 KiB the
/// kernel is opted in first.
fn rows_fwd_config<T: Element>(
    dev: &CudaDevice,
    k: &Kernel,
    rows: usize,
    cols: usize,
) -> Result<(LaunchConfig, i32)> {
    let packs = cols.div_ceil(pack::<T>());
    let threads = block_threads(k, packs);
    let smem = cols * T::DTYPE.size();
    let cache = smem + 1024 <= dev.smem_per_block();
    if cache && smem + 1024 > DEFAULT_SMEM {
        k.func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| driver_err("opting in to shared memory", e))?;
    }
    let blocks = rows.min(dev.sm_count() as usize * 32);
    Ok((
        LaunchConfig {
            grid_dim: (grid(blocks)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: if cache { smem as u32 } else { 0 },
        },
        cache as i32,
    ))
}

/// LayerNorm forward over `rows` contiguous rows of `cols`: `y = (x − mean)·rstd·w + b`;
/// writes per-row `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
    eps: f32,
    mean: &mut CudaViewMut<f32>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    rows_forward(dev, x, y, rows, cols, weight, bias, eps, Some(mean), rstd)
}

/// RMSNorm forward: `y = x·rsqrt(mean(x²) + eps)·w`; writes per-row `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    eps: f32,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    rows_forward(dev, x, y, rows, cols, weight, None, eps, None, rstd)
}

#[allow(clippy::too_many_arguments)]
fn rows_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
    eps: f32,
    mean: Option<&mut CudaViewMut<f32>>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    let numel = rows * cols;
    check_len("x", x.len(), numel)?;
    check_len("y", y.len(), numel)?;
    check_len("rstd", rstd.len(), rows)?;
    if let Some(m) = &mean {
        check_len("mean", m.len(), rows)?;
    }
    for (name, p) in [("weight", &weight), ("bias", &bias)] {
        if let Some(p) = p {
            check_len(name, p.len(), cols)?;
        }
    }
    if numel == 0 {
        return Ok(());
    }
    let (rows_i, cols_i) = (rows as i64, to_i32("cols", cols)?);
    let center = mean.is_some();
    let name = format!(
        "{}_fwd_{}",
        if center { "layer_norm" } else { "rms_norm" },
        T::DTYPE.name()
    );
    let k = dev.kernel("rows", &name)?;
    let (cfg, cache) = rows_fwd_config::<T>(dev, &k, rows, cols)?;
    let stream = dev.stream();
    let mut b = stream.launch_builder(&k.func);
    b.arg(x).arg(y);
    arg_or_null(&mut b, weight);
    if let Some(m) = mean {
        arg_or_null(&mut b, bias);
        b.arg(m);
    }
    b.arg(rstd).arg(&rows_i).arg(&cols_i).arg(&eps).arg(&cache);
    // SAFETY: argument types and order match the kernel's signature (rows.cu); every buffer
    // holds at least the elements the kernel indexes (checked above).
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    Ok(())
}

/// LayerNorm backward: writes `dx`, `dweight = Σ_rows dy·x̂` and `dbias = Σ_rows dy` (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    mean: &CudaView<f32>,
    rstd: &CudaView<f32>,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<()> {
    check_len("mean", mean.len(), rows)?;
    rows_backward(
        dev,
        dy,
        x,
        rows,
        cols,
        weight,
        Some(mean),
        rstd,
        dx,
        dweight,
        dbias,
    )
}

/// RMSNorm backward: writes `dx` and `dweight = Σ_rows dy·x·rstd` (`dsum` receives Σ_rows dy).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    rstd: &CudaView<f32>,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dsum: &mut CudaViewMut<f32>,
) -> Result<()> {
    rows_backward(
        dev, dy, x, rows, cols, weight, None, rstd, dx, dweight, dsum,
    )
}

#[allow(clippy::too_many_arguments)]
fn rows_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    rows: usize,
    cols: usize,
    weight: Option<&CudaView<f32>>,
    mean: Option<&CudaView<f32>>,
    rstd: &CudaView<f32>,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<()> {
    let numel = rows * cols;
    check_len("dy", dy.len(), numel)?;
    check_len("x", x.len(), numel)?;
    check_len("dx", dx.len(), numel)?;
    check_len("rstd", rstd.len(), rows)?;
    check_len("dweight", dweight.len(), cols)?;
    check_len("dbias", dbias.len(), cols)?;
    if let Some(w) = weight {
        check_len("weight", w.len(), cols)?;
    }
    if cols == 0 {
        return Ok(());
    }
    let cols_i = to_i32("cols", cols)?;
    // Partial column sums: one row per block, bounded to 16M floats per buffer.
    let parts = rows.clamp(
        1,
        (dev.sm_count() as usize * 4).min((1 << 24) / cols).max(1),
    );
    let mut pw = dev.alloc::<f32>(parts * cols)?;
    let mut pb = dev.alloc::<f32>(parts * cols)?;
    let stream = dev.stream();
    if rows > 0 {
        let center = mean.is_some();
        let name = format!(
            "{}_bwd_{}",
            if center { "layer_norm" } else { "rms_norm" },
            T::DTYPE.name()
        );
        let k = dev.kernel("rows", &name)?;
        // Eight columns per thread keep the column sums in registers (rows.cu).
        let threads = block_threads(&k, cols.div_ceil(8));
        let rows_i = rows as i64;
        let mut b = stream.launch_builder(&k.func);
        b.arg(dy).arg(x);
        arg_or_null(&mut b, weight);
        if let Some(m) = mean {
            b.arg(m);
        }
        b.arg(rstd)
            .arg(dx)
            .arg(&mut pw)
            .arg(&mut pb)
            .arg(&rows_i)
            .arg(&cols_i);
        let cfg = LaunchConfig {
            grid_dim: (grid(parts)?, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rows.cu's signature; buffers sized above.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
    }
    let used = if rows == 0 { 0 } else { parts } as i32;
    col_sum(dev, &pw, used, cols_i, dweight)?;
    col_sum(dev, &pb, used, cols_i, dbias)
}

fn col_sum(
    dev: &CudaDevice,
    part: &cudarc::driver::CudaSlice<f32>,
    parts: i32,
    cols: i32,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    let f = dev.function("rows", "col_sum_f32")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(part).arg(out).arg(&parts).arg(&cols);
    let cfg = LaunchConfig {
        grid_dim: (grid((cols as usize).div_ceil(256))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: part holds parts·cols floats, out holds cols (checked by the callers).
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// BatchNorm / InstanceNorm / GroupNorm
// ---------------------------------------------------------------------------------------------

/// The `(N, C, S)` view of an input and its layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneShape {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Product of the spatial sizes.
    pub s: usize,
    /// Channels-last (NHWC) rather than contiguous (NCHW).
    pub channels_last: bool,
}

impl PlaneShape {
    fn numel(&self) -> usize {
        self.n * self.c * self.s
    }

    /// The shape as the planes kernels take it: (N, C, S, channels-last flag).
    fn kernel_args(&self) -> Result<(i64, i32, i64, i32)> {
        Ok((
            self.n as i64,
            to_i32("C", self.c)?,
            self.s as i64,
            self.channels_last as i32,
        ))
    }
}

/// How planes form statistic groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Groups {
    /// One group per channel over the batch (BatchNorm): statistics have `C` entries.
    PerChannel,
    /// `G` groups per sample (GroupNorm; InstanceNorm is `G = C`): `N·G` entries.
    PerSample(usize),
}

impl Groups {
    fn code(self) -> i32 {
        match self {
            Groups::PerChannel => 0,
            Groups::PerSample(g) => g as i32,
        }
    }
    fn count(self, s: &PlaneShape) -> usize {
        match self {
            Groups::PerChannel => s.c,
            Groups::PerSample(g) => s.n * g,
        }
    }
}

/// Where forward statistics come from.
pub enum Stats<'a, 'b> {
    /// From the input. Running statistics, when given, are updated with `factor`; `per_sample`
    /// averages per-(n, c) statistics over the batch (InstanceNorm).
    Input {
        /// (running_mean, running_var, factor, per_sample).
        running: Option<(
            &'a mut CudaViewMut<'b, f32>,
            &'a mut CudaViewMut<'b, f32>,
            f32,
            bool,
        )>,
    },
    /// Fixed per-channel running statistics (eval).
    Fixed {
        /// running_mean `[C]`.
        mean: &'a CudaView<'b, f32>,
        /// running_var `[C]`.
        var: &'a CudaView<'b, f32>,
    },
}

fn reduce_chunks(dev: &CudaDevice, s: &PlaneShape) -> usize {
    if s.channels_last {
        s.s.div_ceil(256).max(1)
    } else {
        let planes = (s.n * s.c).max(1);
        let want = (2 * dev.sm_count() as usize).div_ceil(planes);
        want.clamp(1, (s.s / 4096).max(1))
    }
}

fn reduce_config(s: &PlaneShape, chunks: usize) -> Result<LaunchConfig> {
    Ok(if s.channels_last {
        LaunchConfig {
            grid_dim: (grid(s.n * chunks)?, channel_tiles(s.c)?, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    } else {
        LaunchConfig {
            grid_dim: (grid(s.n * s.c * chunks)?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    })
}

/// Grid rows of the channels-last reduction: one per 32 channels, at most 65 535 (the grid's
/// y limit), so at most 2 097 120 channels.
fn channel_tiles(c: usize) -> Result<u32> {
    u32::try_from(c.div_ceil(32))
        .ok()
        .filter(|&t| t <= 65_535)
        .ok_or_else(|| {
            Error::Shape(format!(
                "cuda launch: {c} channels in channels-last layout exceed the 2 097 120 the \
                 reduction grid allows; pass the input contiguous (.to_format(Contiguous))"
            ))
        })
}

fn small_config(n: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid(n.div_ceil(256))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn apply_config<T: Element>(dev: &CudaDevice, numel: usize) -> Result<LaunchConfig> {
    let blocks = (numel / pack::<T>())
        .div_ceil(256)
        .clamp(1, dev.sm_count() as usize * 16);
    Ok(LaunchConfig {
        grid_dim: (grid(blocks)?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Per-plane coefficients (a, m, k) so that y = a·(x − m) + k.
fn coef(
    dev: &CudaDevice,
    s: &PlaneShape,
    g: i32,
    mean_g: &CudaView<f32>,
    rstd_g: &CudaView<f32>,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
) -> Result<[cudarc::driver::CudaSlice<f32>; 3]> {
    let planes = s.n * s.c;
    let mut a = dev.alloc::<f32>(planes)?;
    let mut m = dev.alloc::<f32>(planes)?;
    let mut k = dev.alloc::<f32>(planes)?;
    let f = dev.function("planes", "plane_coef")?;
    let (n_i, c_i, _, _) = s.kernel_args()?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(mean_g).arg(rstd_g);
    arg_or_null(&mut b, weight);
    arg_or_null(&mut b, bias);
    b.arg(&mut a)
        .arg(&mut m)
        .arg(&mut k)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&g);
    // SAFETY: matches planes.cu's plane_coef; statistics hold the group count (checked by callers).
    unsafe { b.launch(small_config(planes)?) }.map_err(launch_err)?;
    Ok([a, m, k])
}

/// r = (1 − f)·r + f·stat per channel (InstanceNorm: batch average of per-plane statistics).
#[allow(clippy::too_many_arguments)]
fn running_update(
    dev: &CudaDevice,
    s: &PlaneShape,
    rm: &mut CudaViewMut<f32>,
    rv: &mut CudaViewMut<f32>,
    mean: &CudaView<f32>,
    varu: &cudarc::driver::CudaSlice<f32>,
    factor: f32,
    per_sample: bool,
) -> Result<()> {
    check_len("running_mean", rm.len(), s.c)?;
    check_len("running_var", rv.len(), s.c)?;
    let (n_i, c_i, _, _) = s.kernel_args()?;
    let per = per_sample as i32;
    let f = dev.function("planes", "running_update")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(rm)
        .arg(rv)
        .arg(mean)
        .arg(varu)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&per)
        .arg(&factor);
    // SAFETY: matches running_update; running buffers hold C floats, statistics the groups.
    unsafe { b.launch(small_config(s.c)?) }.map_err(launch_err)?;
    Ok(())
}

/// BatchNorm / InstanceNorm / GroupNorm forward: writes `y`, and the statistics used into
/// `mean`/`rstd` (`groups` entries for input statistics, `C` for fixed ones).
#[allow(clippy::too_many_arguments)]
pub fn planes_forward<T: Element>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    y: &mut CudaViewMut<T>,
    shape: PlaneShape,
    groups: Groups,
    weight: Option<&CudaView<f32>>,
    bias: Option<&CudaView<f32>>,
    eps: f32,
    stats: Stats<'_, '_>,
    mean: &mut CudaViewMut<f32>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    let s = shape;
    let numel = s.numel();
    check_len("x", x.len(), numel)?;
    check_len("y", y.len(), numel)?;
    for (name, p) in [("weight", &weight), ("bias", &bias)] {
        if let Some(p) = p {
            check_len(name, p.len(), s.c)?;
        }
    }
    if let Groups::PerSample(g) = groups {
        if g == 0 || !s.c.is_multiple_of(g) {
            return Err(Error::Shape(format!(
                "cuda launch: {g} groups do not divide {} channels",
                s.c
            )));
        }
    }
    let (n_i, c_i, s_i, cl) = s.kernel_args()?;
    let stream = dev.stream();
    let dt = T::DTYPE.name();
    let g_code = match stats {
        Stats::Input { .. } => groups.code(),
        Stats::Fixed { .. } => 0,
    };
    match stats {
        Stats::Input { running } => {
            let ng = groups.count(&s);
            check_len("mean", mean.len(), ng)?;
            check_len("rstd", rstd.len(), ng)?;
            if numel == 0 {
                return Ok(());
            }
            if let (Groups::PerSample(g), false) = (groups, s.channels_last) {
                // Contiguous GroupNorm/InstanceNorm: each (n, group) is one contiguous row of
                // C/G·S values; one pass computes its statistics and output (x read once when
                // the row fits on chip).
                let mut varu = dev.alloc::<f32>(ng)?;
                let k = dev.kernel("rows", &format!("group_norm_fwd_{dt}"))?;
                let cols = (s.c / g) * s.s;
                let (cfg, cache) = rows_fwd_config::<T>(dev, &k, ng, cols)?;
                let (rows_i, cols_i, seg_i, g_i) = (
                    ng as i64,
                    to_i32("C/G·S", cols)?,
                    to_i32("S", s.s)?,
                    g as i32,
                );
                let mut b = stream.launch_builder(&k.func);
                b.arg(x).arg(&mut *y);
                arg_or_null(&mut b, weight);
                arg_or_null(&mut b, bias);
                b.arg(&mut *mean).arg(&mut *rstd).arg(&mut varu);
                b.arg(&rows_i)
                    .arg(&cols_i)
                    .arg(&seg_i)
                    .arg(&g_i)
                    .arg(&eps)
                    .arg(&cache);
                // SAFETY: matches rows.cu's group_norm_fwd; x/y hold N·C·S, stats N·G elements.
                unsafe { b.launch(cfg) }.map_err(launch_err)?;
                if let Some((rm, rv, factor, per_sample)) = running {
                    running_update(dev, &s, rm, rv, &mean.as_view(), &varu, factor, per_sample)?;
                }
                return Ok(());
            }
            let chunks = reduce_chunks(dev, &s);
            let chunks_i = to_i32("chunks", chunks)?;
            let mut part = dev.alloc::<f32>(s.n * s.c * chunks * 3)?;
            let f = dev.function("planes", &format!("plane_stats_{dt}"))?;
            let mut b = stream.launch_builder(&f);
            b.arg(x)
                .arg(&mut part)
                .arg(&n_i)
                .arg(&c_i)
                .arg(&s_i)
                .arg(&cl)
                .arg(&chunks_i);
            // SAFETY: matches plane_stats; part holds N·C·chunks·3 floats.
            unsafe { b.launch(reduce_config(&s, chunks)?) }.map_err(launch_err)?;

            let mut varu = dev.alloc::<f32>(ng)?;
            let f = dev.function("planes", "plane_finalize")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&part).arg(&mut *mean).arg(&mut *rstd).arg(&mut varu);
            b.arg(&n_i).arg(&c_i).arg(&chunks_i).arg(&g_code).arg(&eps);
            // SAFETY: matches plane_finalize; mean/rstd/varu hold the group count.
            unsafe { b.launch(small_config(ng)?) }.map_err(launch_err)?;

            if let Some((rm, rv, factor, per_sample)) = running {
                running_update(dev, &s, rm, rv, &mean.as_view(), &varu, factor, per_sample)?;
            }
        }
        Stats::Fixed { mean: rm, var: rv } => {
            check_len("running_mean", rm.len(), s.c)?;
            check_len("running_var", rv.len(), s.c)?;
            check_len("mean", mean.len(), s.c)?;
            check_len("rstd", rstd.len(), s.c)?;
            let f = dev.function("planes", "eval_stats")?;
            let mut b = stream.launch_builder(&f);
            b.arg(rm)
                .arg(rv)
                .arg(&mut *mean)
                .arg(&mut *rstd)
                .arg(&c_i)
                .arg(&eps);
            // SAFETY: matches eval_stats; all four buffers hold C floats.
            unsafe { b.launch(small_config(s.c)?) }.map_err(launch_err)?;
            if numel == 0 {
                return Ok(());
            }
        }
    }
    let [a, m, k] = coef(
        dev,
        &s,
        g_code,
        &mean.as_view(),
        &rstd.as_view(),
        weight,
        bias,
    )?;
    let f = dev.function("planes", &format!("plane_apply_{dt}"))?;
    let mut b = stream.launch_builder(&f);
    b.arg(x)
        .arg(y)
        .arg(&a)
        .arg(&m)
        .arg(&k)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&s_i)
        .arg(&cl);
    // SAFETY: matches plane_apply; coefficient buffers hold N·C floats.
    unsafe { b.launch(apply_config::<T>(dev, numel)?) }.map_err(launch_err)?;
    Ok(())
}

/// Backward of [`planes_forward`]: writes `dx`, `dweight` and `dbias` (`[C]`). `from_input`
/// says whether `mean`/`rstd` were input statistics (per group) or fixed ones (per channel).
#[allow(clippy::too_many_arguments)]
pub fn planes_backward<T: Element>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    shape: PlaneShape,
    groups: Groups,
    weight: Option<&CudaView<f32>>,
    mean: &CudaView<f32>,
    rstd: &CudaView<f32>,
    from_input: bool,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<()> {
    let s = shape;
    let numel = s.numel();
    check_len("dy", dy.len(), numel)?;
    check_len("x", x.len(), numel)?;
    check_len("dx", dx.len(), numel)?;
    check_len("dweight", dweight.len(), s.c)?;
    check_len("dbias", dbias.len(), s.c)?;
    if let Some(w) = weight {
        check_len("weight", w.len(), s.c)?;
    }
    let g_code = if from_input { groups.code() } else { 0 };
    let ng = if from_input { groups.count(&s) } else { s.c };
    check_len("mean", mean.len(), ng)?;
    check_len("rstd", rstd.len(), ng)?;
    let (n_i, c_i, s_i, cl) = s.kernel_args()?;
    let stream = dev.stream();
    let dt = T::DTYPE.name();
    let chunks = reduce_chunks(dev, &s);
    let chunks_i = to_i32("chunks", chunks)?;
    let [a, m, _] = coef(dev, &s, g_code, mean, rstd, weight, None)?;
    let mut part = dev.zeros::<f32>(s.n * s.c * chunks * 2)?;
    if numel > 0 {
        let f = dev.function("planes", &format!("plane_grad_sums_{dt}"))?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy)
            .arg(x)
            .arg(&m)
            .arg(&mut part)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&s_i)
            .arg(&cl)
            .arg(&chunks_i);
        // SAFETY: matches plane_grad_sums; part holds N·C·chunks·2 floats.
        unsafe { b.launch(reduce_config(&s, chunks)?) }.map_err(launch_err)?;
    }
    let planes = s.n * s.c;
    let mut bc = dev.alloc::<f32>(planes)?;
    let mut kc = dev.alloc::<f32>(planes)?;
    let fi = from_input as i32;
    let f = dev.function("planes", "grad_finalize")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&part);
    arg_or_null(&mut b, weight);
    b.arg(rstd)
        .arg(&mut bc)
        .arg(&mut kc)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&s_i)
        .arg(&chunks_i)
        .arg(&g_code)
        .arg(&fi);
    // SAFETY: matches grad_finalize; coefficient buffers hold N·C floats.
    unsafe { b.launch(small_config(ng)?) }.map_err(launch_err)?;

    let f = dev.function("planes", "grad_params")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&part)
        .arg(rstd)
        .arg(dweight)
        .arg(dbias)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&chunks_i)
        .arg(&g_code);
    // SAFETY: matches grad_params; dweight/dbias hold C floats.
    unsafe { b.launch(small_config(s.c)?) }.map_err(launch_err)?;

    if numel > 0 {
        let f = dev.function("planes", &format!("plane_grad_apply_{dt}"))?;
        let mut b = stream.launch_builder(&f);
        b.arg(dy)
            .arg(x)
            .arg(dx)
            .arg(&a)
            .arg(&bc)
            .arg(&m)
            .arg(&kc)
            .arg(&n_i)
            .arg(&c_i)
            .arg(&s_i)
            .arg(&cl);
        // SAFETY: matches plane_grad_apply; all per-plane buffers hold N·C floats.
        unsafe { b.launch(apply_config::<T>(dev, numel)?) }.map_err(launch_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_last_grid_limit_is_an_error() {
        assert_eq!(channel_tiles(1).unwrap(), 1);
        assert_eq!(channel_tiles(2_097_120).unwrap(), 65_535);
        let e = channel_tiles(2_097_121).unwrap_err().to_string();
        assert!(
            e.contains("2097121 channels") && e.contains("contiguous"),
            "{e}"
        );
    }
}
