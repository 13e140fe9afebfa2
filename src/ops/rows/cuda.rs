//! The rows family on CUDA: LayerNorm and RMSNorm launches (`kernels/rows.cu`).
//!
//! Two levels: the tensor level the op fronts call (`layer_norm_fwd`, ...), and below it the
//! public launch layer over caller-held cudarc views (`layer_norm_forward`, ..., re-exported as
//! [`crate::raw`]). Every launch function checks lengths (an `Err`, never a panic or an
//! out-of-bounds launch), queues its kernels on the device's stream and returns without
//! synchronizing. Element type `T` is `f32`, `f16` or `bf16`; parameters, statistics and
//! parameter gradients are `f32`.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, LaunchConfig, PushKernelArg};

use crate::cuda::launch::{
    aligned16, arg_or_null, block_threads, check_len, grid, launch_err, pack, row_len, to_i32,
};
use crate::cuda::{CudaDevice, Kernel};
use crate::dtype::Element;
use crate::error::Result;
use crate::ops::{kernels, Gradients, NormOp, NormOutput, SavedStats};
use crate::tensor::{tensor_view, MemoryFormat, Tensor};

/// Tensor-level forward (see [`super::forward`]).
pub(crate) fn forward<T: Element>(
    dev: &CudaDevice,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    bias: Option<&Tensor<f32>>,
    eps: f64,
    op: NormOp,
) -> Result<NormOutput<T>> {
    let center = op.welford_mean();
    let numel = x.numel();
    let rows = numel.checked_div(cols).unwrap_or(0);
    let mut y = dev.alloc::<T>(numel)?;
    let mut mean = dev.alloc::<f32>(rows)?;
    let mut rstd = dev.alloc::<f32>(rows)?;
    {
        let xv = tensor_view(x)?;
        let wv = weight.map(tensor_view).transpose()?;
        let bv = bias.map(tensor_view).transpose()?;
        let (mut yv, mut mv, mut rv) = (
            y.slice_mut(0..numel),
            mean.slice_mut(0..rows),
            rstd.slice_mut(0..rows),
        );
        if center {
            layer_norm_forward(
                dev,
                &xv,
                &mut yv,
                rows,
                cols,
                wv.as_ref(),
                bv.as_ref(),
                eps as f32,
                &mut mv,
                &mut rv,
            )?;
        } else {
            rms_norm_forward(
                dev,
                &xv,
                &mut yv,
                rows,
                cols,
                wv.as_ref(),
                eps as f32,
                &mut rv,
            )?;
        }
    }
    Ok(NormOutput {
        output: Tensor::from_cuda(dev, y, x.shape(), MemoryFormat::Contiguous),
        stats: SavedStats::new(
            op,
            x.shape(),
            center.then(|| Tensor::from_cuda(dev, mean, &[rows], MemoryFormat::Contiguous)),
            Tensor::from_cuda(dev, rstd, &[rows], MemoryFormat::Contiguous),
            true,
        ),
    })
}

/// Tensor-level backward (see [`super::backward`]): `dx`, and `[cols]` parameter gradients.
pub(crate) fn backward<T: Element>(
    dev: &CudaDevice,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    cols: usize,
    weight: Option<&Tensor<f32>>,
    mean: Option<&Tensor<f32>>,
    rstd: &Tensor<f32>,
) -> Result<Gradients<T>> {
    let numel = x.numel();
    let rows = numel.checked_div(cols).unwrap_or(0);
    let mut dx = dev.alloc::<T>(numel)?;
    let mut dw = dev.alloc::<f32>(cols)?;
    let mut db = dev.alloc::<f32>(cols)?;
    {
        let (gv, xv, rv) = (tensor_view(dy)?, tensor_view(x)?, tensor_view(rstd)?);
        let wv = weight.map(tensor_view).transpose()?;
        let (mut dxv, mut dwv, mut dbv) = (
            dx.slice_mut(0..numel),
            dw.slice_mut(0..cols),
            db.slice_mut(0..cols),
        );
        match mean {
            Some(m) => {
                let mv = tensor_view(m)?;
                layer_norm_backward(
                    dev,
                    &gv,
                    &xv,
                    rows,
                    cols,
                    wv.as_ref(),
                    &mv,
                    &rv,
                    &mut dxv,
                    &mut dwv,
                    &mut dbv,
                )?
            }
            None => rms_norm_backward(
                dev,
                &gv,
                &xv,
                rows,
                cols,
                wv.as_ref(),
                &rv,
                &mut dxv,
                &mut dwv,
                &mut dbv,
            )?,
        }
    }
    // Parameter gradients come back as [cols]; the op front gives them normalized_shape.
    Ok(Gradients {
        dx: Tensor::from_cuda(dev, dx, x.shape(), MemoryFormat::Contiguous),
        dweight: Some(Tensor::from_cuda(
            dev,
            dw,
            &[cols],
            MemoryFormat::Contiguous,
        )),
        dbias: Some(Tensor::from_cuda(
            dev,
            db,
            &[cols],
            MemoryFormat::Contiguous,
        )),
    })
}

// ---------------------------------------------------------------------------------------------
// The launch layer over cudarc views
// ---------------------------------------------------------------------------------------------

/// `rows·cols` for the launch layer, whose sizes come from the caller: an `Err` when it
/// overflows or reaches [`MAX_ELEMENTS`](crate::cuda::launch::MAX_ELEMENTS).
fn rows_numel(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .filter(|&e| e < crate::cuda::launch::MAX_ELEMENTS)
        .ok_or_else(|| {
            crate::Error::Shape(format!(
                "cuda launch: {rows} rows of {cols} overflow; split the input"
            ))
        })
}

/// The block-per-row forward kernel for rows of `cols` (`base` is `layer_norm_fwd`,
/// `rms_norm_fwd` or `group_norm_fwd`), its launch configuration and its `cache` argument:
/// - rows of more than [`CLUSTER_MIN_ROW_BYTES`], `packed` (x and y 16-byte aligned, rows and
///   affine segments whole packs), on a GPU with thread-block clusters (sm_90 on), where
///   [`cluster_plan`] covers the row and a cluster of its blocks can be resident: the cluster
///   kernel (`<base>_cluster<CS>`), the row in registers across the cluster's blocks (x read
///   once, several clusters an SM). `CUNORM_ROWS_CLUSTER=0` turns it off;
/// - the row fits the dynamic shared memory the kernel was opted in to at load (the device's
///   limit less the kernel's static reduction scratch): `base`, the row cached as T;
/// - else, for rows of whole packs, when the part beyond [`WIDE_K`] packs per thread of the
///   block fits it: the wide kernel (`<base>_wide`), which holds those packs in registers and
///   the rest in shared memory (x still read once);
/// - else `base` uncached (x read twice).
///
/// The choice follows from the shape and the kernels' limits on the device, never from the
/// timing of a run.
pub(crate) fn rows_fwd_kernel<T: Element>(
    dev: &CudaDevice,
    base: &str,
    rows: usize,
    cols: usize,
    packed: bool,
) -> Result<(Kernel, LaunchConfig, i32)> {
    let k = dev.kernel(kernels::module::<T>("rows"), &kernels::name::<T>(base))?;
    let packs = cols.div_ceil(pack::<T>());
    let blocks = grid(rows.min(dev.sm_count() as usize * 32))?;
    let row_bytes = cols * T::DTYPE.size();
    if packed
        && row_bytes > CLUSTER_MIN_ROW_BYTES
        && cols.is_multiple_of(pack::<T>())
        && dev.has_clusters()
        && !rows_cluster_knob_off()
        && !matches!(rows_path(), RowsPath::Block)
    {
        if let Some(plan) = cluster_plan(packs) {
            let ck = dev.kernel(
                kernels::module::<T>("rows"),
                &kernels::name::<T>(&format!("{base}_cluster{}", plan.blocks)),
            )?;
            let cfg = LaunchConfig {
                // Whole clusters, striding over the rows (the row a cluster takes never
                // changes a row's bits).
                grid_dim: (
                    grid(rows.clamp(1, dev.sm_count() as usize * 32) * plan.blocks)?,
                    1,
                    1,
                ),
                block_dim: (plan.threads as u32, 1, 1),
                shared_mem_bytes: CLUSTER_SMEM,
            };
            let name = format!("{base}_cluster{}", plan.blocks);
            if plan.threads > ck.max_threads as usize {
                cluster_refused(&name, "more threads a block than the kernel allows")?;
            } else if !dev.clusters_fit(&ck, &cfg) {
                cluster_refused(&name, "no cluster of it can be resident on this GPU")?;
            } else {
                return Ok((ck, cfg, 1));
            }
        }
    }
    if row_bytes > k.max_dynamic_smem && cols.is_multiple_of(pack::<T>()) {
        let wide = dev.kernel(
            kernels::module::<T>("rows"),
            &kernels::name::<T>(&format!("{base}_wide")),
        )?;
        let threads = block_threads(&wide, packs);
        let rest = packs.saturating_sub(WIDE_K * threads as usize) * 16;
        if rest <= wide.max_dynamic_smem {
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: rest as u32,
            };
            return Ok((wide, cfg, 1));
        }
    }
    // Above 32 registers a 1024-thread block leaves an SM half empty (65 536 registers hold one
    // such block): 512 threads let three or more blocks share it.
    let cap = if k.regs > 32 { 512 } else { 1024 };
    let threads = block_threads(&k, packs).min(cap);
    let cache = row_bytes <= k.max_dynamic_smem;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: if cache { row_bytes as u32 } else { 0 },
    };
    Ok((k, cfg, cache as i32))
}

/// Rows longer than this take the cluster forward where the GPU has clusters: a block-per-row
/// kernel caching such a row in shared memory keeps two or fewer blocks an SM, idle while they
/// reduce (runs H200-L: 31–66 % of copy bandwidth at 64 K columns).
pub(crate) const CLUSTER_MIN_ROW_BYTES: usize = 64 * 1024;
/// 16-byte packs a thread of the cluster forward holds (rows.cu `ROWS_CLUSTER_K`).
pub(crate) const CLUSTER_K: usize = 8;
/// The cluster forward's dynamic shared memory: 32 floats of block scratch and its two slots.
const CLUSTER_SMEM: u32 = 34 * 4;

/// The cluster forward's shape: `blocks` a cluster (a `<base>_cluster<blocks>` kernel exists for
/// 4 and 8; 8 is the largest portable cluster) of `threads` threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClusterPlan {
    pub blocks: usize,
    pub threads: usize,
}

/// The smallest cluster shape holding a row of `packs` 16-byte packs in registers
/// ([`CLUSTER_K`] a thread): blocks of 256 threads first (more blocks resident an SM), then 512;
/// `None` beyond 8 × 512 × 8 packs (512 KiB). (Two blocks of 256 would hold 64 KiB: never more
/// than [`CLUSTER_MIN_ROW_BYTES`], so no 2-block kernel.)
pub(crate) fn cluster_plan(packs: usize) -> Option<ClusterPlan> {
    [256, 512].into_iter().find_map(|threads| {
        [4, 8]
            .into_iter()
            .find(|&blocks| blocks * threads * CLUSTER_K >= packs)
            .map(|blocks| ClusterPlan { blocks, threads })
    })
}

/// 16-byte packs of x and of dy a thread of the cluster backward holds (rows.cu
/// `ROWS_CLUSTER_BWD_K`), and its blocks a cluster (its one kernel size).
pub(crate) const CLUSTER_BWD_K: usize = 4;
pub(crate) const CLUSTER_BWD_BLOCKS: usize = 8;

/// Threads a block of the cluster backward for a row of `packs` 16-byte packs: 256 or 512, the
/// fewer that hold the row ([`CLUSTER_BWD_K`] packs of x and dy a thread, 8 blocks); `None` for
/// rows beyond 8 × 512 × 4 packs (256 KiB of x).
pub(crate) fn cluster_bwd_threads(packs: usize) -> Option<usize> {
    [256, 512]
        .into_iter()
        .find(|&t| CLUSTER_BWD_BLOCKS * t * CLUSTER_BWD_K >= packs)
}

/// Rows a cluster of the cluster backward takes (one partial row of dγ/dβ each) and the
/// clusters, from the shape alone: about 512 blocks (64 clusters) for the GPU, chunks of 8 to
/// 128 rows so that the partials (written, then read by the column sum) stay small beside x
/// and dy, at most 2^24 partial floats per buffer.
pub(crate) fn cluster_bwd_chunks(rows: usize, cols: usize) -> (usize, usize) {
    let mut chunk = (rows * CLUSTER_BWD_BLOCKS).div_ceil(512).clamp(8, 128);
    chunk = chunk.max(rows.div_ceil(((1usize << 24) / cols.max(1)).max(1)));
    (chunk, rows.div_ceil(chunk).max(1))
}

/// The cluster backward's kernel, launch configuration, rows a cluster and clusters for rows of
/// `cols` (whole packs, aligned: the caller checks), where the GPU has clusters, the row fits
/// [`cluster_bwd_threads`] and a cluster can be resident; `CUNORM_ROWS_CLUSTER=0` turns it off.
fn cluster_bwd_kernel<T: Element>(
    dev: &CudaDevice,
    op: &str,
    rows: usize,
    cols: usize,
) -> Result<Option<(Kernel, LaunchConfig, usize, usize)>> {
    let packs = cols / pack::<T>();
    let Some(threads) = cluster_bwd_threads(packs) else {
        return Ok(None);
    };
    if !dev.has_clusters() || rows_cluster_knob_off() {
        return Ok(None);
    }
    let k = dev.kernel(
        kernels::module::<T>("rows"),
        &kernels::name::<T>(&format!("{op}_bwd_cluster{CLUSTER_BWD_BLOCKS}")),
    )?;
    // 64 floats of reduction scratch and slots, then dγ and dβ of the block's packs.
    let smem = (64 + 2 * CLUSTER_BWD_K * threads * pack::<T>()) * 4;
    let (chunk, clusters) = cluster_bwd_chunks(rows, cols);
    let cfg = LaunchConfig {
        grid_dim: (grid(clusters * CLUSTER_BWD_BLOCKS)?, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let name = format!("{op}_bwd_cluster{CLUSTER_BWD_BLOCKS}");
    if threads > k.max_threads as usize {
        cluster_refused(&name, "more threads a block than the kernel allows")?;
        return Ok(None);
    }
    if smem > k.max_dynamic_smem {
        cluster_refused(&name, "more shared memory a block than the kernel may use")?;
        return Ok(None);
    }
    if !dev.clusters_fit(&k, &cfg) {
        cluster_refused(&name, "no cluster of it can be resident on this GPU")?;
        return Ok(None);
    }
    Ok(Some((k, cfg, chunk, clusters)))
}

/// A cluster kernel the shape asked for cannot run here (its threads, shared memory or a
/// resident cluster): the op takes the kernels before it, unless `CUNORM_REQUIRE_CLUSTERS=1`
/// (a GPU run's check that the cluster kernels really ran) makes that an `Err`.
fn cluster_refused(kernel: &str, why: &str) -> Result<()> {
    static KNOB: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *KNOB.get_or_init(|| std::env::var("CUNORM_REQUIRE_CLUSTERS").is_ok_and(|v| v.trim() == "1"))
    {
        return Err(crate::Error::Unavailable(format!(
            "{kernel}: {why} (cuOccupancyMaxActiveClusters, the kernel's limits), and \
             CUNORM_REQUIRE_CLUSTERS=1 is set; unset it to fall back to the kernels without clusters"
        )));
    }
    Ok(())
}

/// `CUNORM_ROWS_CLUSTER=0`: no cluster forward or backward (rows of more than 64 KiB take the
/// block-per-row forwards, rows the team kernels cannot hold the long-rows backward).
fn rows_cluster_knob_off() -> bool {
    static KNOB: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOB.get_or_init(|| std::env::var("CUNORM_ROWS_CLUSTER").is_ok_and(|v| v.trim() == "0"))
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
    let numel = rows_numel(rows, cols)?;
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
    let (rows_i, cols_i) = (rows as i64, row_len("cols", cols)?);
    let center = mean.is_some();
    let op = if center { "layer_norm" } else { "rms_norm" };
    let packs = cols.div_ceil(pack::<T>());
    let team_path = matches!(
        rows_path(),
        RowsPath::Auto | RowsPath::Long | RowsPath::Team
    );
    if team_path
        && cols.is_multiple_of(pack::<T>())
        && aligned16(x, dev.stream())
        && aligned16(&y.as_view(), dev.stream())
    {
        if let Some(shape) = TeamShape::of(packs, team_kmax(T::DTYPE.size(), center, packs)) {
            let k = dev.kernel(
                kernels::module::<T>("rows"),
                &kernels::name::<T>(&format!("{op}_fwd_team{}", shape.k)),
            )?;
            if shape.block <= k.max_threads as usize {
                let stream = dev.stream();
                let mut b = stream.launch_builder(&k.func);
                let lead = (&rows_i, &cols_i, &eps);
                push_fwd_args(&mut b, x, y, weight, bias, mean, rstd, lead);
                let tpr = shape.tpr as i32;
                b.arg(&tpr);
                let teams = shape.block / shape.tpr;
                let cfg = LaunchConfig {
                    grid_dim: (grid(rows.div_ceil(teams).min(MAX_ROW_BLOCKS))?, 1, 1),
                    block_dim: (shape.block as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches rows.cu's rows_fwd_team entry points; lengths checked above,
                // x and y 16-byte aligned and whole packs as the kernel requires.
                unsafe { b.launch(cfg) }.map_err(launch_err)?;
                return Ok(());
            }
        }
    }
    let reg = match rows_path() {
        RowsPath::Block => false,
        RowsPath::Reg => reg_instantiated(T::DTYPE.size(), packs),
        _ => fwd_prefers_reg(T::DTYPE.size(), packs),
    };
    if reg {
        if let Some((team, k)) = reg_kernel::<T>(dev, op, "fwd", "reg", packs, FWD_REG_K, 0)? {
            let stream = dev.stream();
            let mut b = stream.launch_builder(&k.func);
            let lead = (&rows_i, &cols_i, &eps);
            push_fwd_args(&mut b, x, y, weight, bias, mean, rstd, lead);
            let (tpr, kk) = (team.tpr as i32, team.k as i32);
            b.arg(&tpr).arg(&kk);
            let cfg = LaunchConfig {
                grid_dim: (
                    grid(rows.div_ceil(team.per_block).min(MAX_ROW_BLOCKS))?,
                    1,
                    1,
                ),
                block_dim: (team.block_threads(), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches rows.cu's rows_fwd_reg entry points; lengths checked above.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
            return Ok(());
        }
    }
    let base = if center {
        "layer_norm_fwd"
    } else {
        "rms_norm_fwd"
    };
    let packed = aligned16(x, dev.stream()) && aligned16(&y.as_view(), dev.stream());
    let (k, cfg, cache) = rows_fwd_kernel::<T>(dev, base, rows, cols, packed)?;
    let stream = dev.stream();
    let mut b = stream.launch_builder(&k.func);
    let lead = (&rows_i, &cols_i, &eps);
    push_fwd_args(&mut b, x, y, weight, bias, mean, rstd, lead);
    b.arg(&cache);
    // SAFETY: argument types and order match the kernel's signature (rows.cu); every buffer
    // holds at least the elements the kernel indexes (checked above).
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    Ok(())
}

/// The arguments every row forward kernel starts with (rows.cu): x, y, w (or null), then for
/// LayerNorm (a mean to write) b (or null) and mean, then rstd, rows, cols, eps; each kernel's
/// geometry follows.
#[allow(clippy::too_many_arguments)]
fn push_fwd_args<'l, T>(
    b: &mut LaunchArgs<'l>,
    x: &'l CudaView<T>,
    y: &'l mut CudaViewMut<T>,
    weight: Option<&'l CudaView<f32>>,
    bias: Option<&'l CudaView<f32>>,
    mean: Option<&'l mut CudaViewMut<f32>>,
    rstd: &'l mut CudaViewMut<f32>,
    (rows, cols, eps): (&'l i64, &'l i32, &'l f32),
) {
    b.arg(x).arg(y);
    arg_or_null(b, weight);
    if let Some(m) = mean {
        arg_or_null(b, bias);
        b.arg(m);
    }
    b.arg(rstd).arg(rows).arg(cols).arg(eps);
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
    let numel = rows_numel(rows, cols)?;
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
    let cols_i = row_len("cols", cols)?;
    let center = mean.is_some();
    let stream = dev.stream();
    let op = if center { "layer_norm" } else { "rms_norm" };
    let packs = cols.div_ceil(pack::<T>());
    // Shared memory: dγ and dβ partials of the block's teams, 2·cols floats each.
    let smem_per_team = 2 * cols * 4;
    let bufs = BwdBufs {
        dy,
        x,
        weight,
        mean,
        rstd,
    };
    // The team backward: every aligned row of whole packs, unless another path is forced; else,
    // or when its team does not fit, as before it. Since its teams' partials are summed per
    // block (H200, 2026-11-27) it won everywhere: the long-rows kernels had stayed ahead at 1 K
    // f16/bf16 columns (0.0981 against 0.0996 ms); now [16384, 1024] f16 takes 0.0850 (long
    // rows 0.0989), bf16 0.0847 (0.1044). The earlier wins stand: every f32 row (LayerNorm
    // [8192, 8192] 0.353 → 0.290 ms), f16/bf16 rows of up to 32 packs ([65536, 128] 0.111 →
    // 0.061) and of 4 K and 8 K columns.
    let team = matches!(rows_path(), RowsPath::Team | RowsPath::Auto)
        && cols.is_multiple_of(pack::<T>())
        && aligned16(dy, stream)
        && aligned16(x, stream)
        && aligned16(&dx.as_view(), stream);
    let mut reg = None;
    if team {
        reg = reg_kernel::<T>(dev, op, "bwd", "team", packs, BWD_REG_K, smem_per_team)?;
    }
    let team = reg.is_some();
    if reg.is_none() {
        reg = match rows_path() {
            RowsPath::Long => None,
            // Wherever rows.cu has the register-resident backward, it won over the long-rows
            // kernels (`reg_instantiated`).
            _ if !reg_instantiated(T::DTYPE.size(), packs) => None,
            _ => reg_kernel::<T>(dev, op, "bwd", "reg", packs, BWD_REG_K, smem_per_team)?,
        };
    }
    if let Some((geo, k)) = reg {
        // One partial row of column sums per team (the team kernel: per block): enough of them
        // to keep the GPU busy, few enough that the partials (written, then read by the column
        // sum) stay near a tenth of the minimum traffic; from the shape alone.
        let want = (rows * 3 * T::DTYPE.size() / 128).clamp(BWD_MIN_TEAMS, BWD_MAX_TEAMS);
        // The team kernel writes a partial row per block: `want` blocks, except f32 warp teams,
        // which keep `want` teams (a quarter of the blocks: at [65536, 128] f32 four times the
        // blocks took 0.0632 ms against 0.0541, while f16/bf16 gained from them: [16384, 1024]
        // f16 0.0850, [65536, 128] 0.0598 against 0.0612). The register-resident kernel writes
        // a partial row per team, `want` teams.
        let per_team = !team || (geo.tpr <= 32 && T::DTYPE.size() == 4);
        let blocks = if per_team {
            want.clamp(1, rows.max(1)).div_ceil(geo.per_block)
        } else {
            want.clamp(1, rows.div_ceil(geo.per_block).max(1))
        };
        let parts = if team { blocks } else { blocks * geo.per_block };
        let team = geo;
        let mut pw = dev.alloc::<f32>(parts * cols)?;
        let mut pb = dev.alloc::<f32>(parts * cols)?;
        if rows > 0 {
            let (rows_i, tpr, kk) = (rows as i64, team.tpr as i32, team.k as i32);
            let mut b = stream.launch_builder(&k.func);
            bufs.push(&mut b, dx, &mut pw, &mut pb, &rows_i, &cols_i);
            b.arg(&tpr).arg(&kk);
            let cfg = LaunchConfig {
                grid_dim: (grid(blocks)?, 1, 1),
                block_dim: (team.block_threads(), 1, 1),
                shared_mem_bytes: (team.per_block * smem_per_team) as u32,
            };
            // SAFETY: matches rows.cu's rows_bwd_reg and rows_bwd_team entry points (the team
            // kernel only for aligned rows of whole packs, checked above); the partial buffers
            // hold one row per team of the grid (the team kernel: per block), shared memory
            // 2·cols floats per team.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
        }
        let used = if rows == 0 { 0 } else { parts };
        col_sum(dev, kernels::module::<T>("rows"), &pw, used, cols, dweight)?;
        return col_sum(dev, kernels::module::<T>("rows"), &pb, used, cols, dbias);
    }
    // Long rows on a GPU with clusters: the row in registers across a cluster (rows.cu
    // `rows_bwd_cluster`), x and dy read once; one partial row of column sums per cluster.
    let packed = cols.is_multiple_of(pack::<T>())
        && aligned16(dy, stream)
        && aligned16(x, stream)
        && aligned16(&dx.as_view(), stream);
    if packed && rows > 0 && matches!(rows_path(), RowsPath::Auto) {
        if let Some((k, cfg, chunk, clusters)) = cluster_bwd_kernel::<T>(dev, op, rows, cols)? {
            let mut pw = dev.alloc::<f32>(clusters * cols)?;
            let mut pb = dev.alloc::<f32>(clusters * cols)?;
            let (rows_i, chunk_i) = (rows as i64, to_i32("rows per cluster", chunk)?);
            let mut b = stream.launch_builder(&k.func);
            bufs.push(&mut b, dx, &mut pw, &mut pb, &rows_i, &cols_i);
            b.arg(&chunk_i);
            // SAFETY: matches rows.cu's rows_bwd_cluster entry points (aligned rows of whole
            // packs, checked above); the partial buffers hold one row per cluster, the grid is
            // whole clusters, shared memory as `cluster_bwd_kernel` sized it.
            unsafe { b.launch(cfg) }.map_err(launch_err)?;
            col_sum(
                dev,
                kernels::module::<T>("rows"),
                &pw,
                clusters,
                cols,
                dweight,
            )?;
            return col_sum(
                dev,
                kernels::module::<T>("rows"),
                &pb,
                clusters,
                cols,
                dbias,
            );
        }
    }
    // Long rows: the row sums, then column tiles over chunks of rows (rows.cu `rows_bwd_sums`,
    // `rows_bwd_tile`): one partial row of column sums per chunk.
    let (threads, chunk, chunks) = tile_geometry(rows, cols, packs);
    let mut pw = dev.alloc::<f32>(chunks * cols)?;
    let mut pb = dev.alloc::<f32>(chunks * cols)?;
    if rows > 0 {
        let mut sums = dev.alloc::<f32>(2 * rows)?;
        let rows_i = rows as i64;
        let k = dev.kernel(
            kernels::module::<T>("rows"),
            &kernels::name::<T>(&format!("{op}_bwd_sums")),
        )?;
        let mut b = stream.launch_builder(&k.func);
        bufs.push_inputs(&mut b);
        b.arg(&mut sums).arg(&rows_i).arg(&cols_i);
        // One block per row (grid-stride): the grid does not change any row's sum.
        let cfg = LaunchConfig {
            grid_dim: (grid(rows.min(dev.sm_count() as usize * 16))?, 1, 1),
            block_dim: (block_threads(&k, packs).min(1024), 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rows.cu's *_bwd_sums entry points; sums holds 2·rows floats.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;

        let k = dev.kernel(
            kernels::module::<T>("rows"),
            &kernels::name::<T>(&format!("{op}_bwd_tile")),
        )?;
        let chunk_i = to_i32("rows per chunk", chunk)?;
        let mut b = stream.launch_builder(&k.func);
        bufs.push_inputs(&mut b);
        b.arg(&sums)
            .arg(&mut *dx)
            .arg(&mut pw)
            .arg(&mut pb)
            .arg(&rows_i)
            .arg(&cols_i)
            .arg(&chunk_i);
        let threads = block_threads(&k, threads);
        let cfg = LaunchConfig {
            grid_dim: (
                grid(packs.div_ceil(threads as usize))?,
                to_u32_grid(chunks)?,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches rows.cu's *_bwd_tile entry points; the partial buffers hold one row
        // per chunk, sums 2·rows floats.
        unsafe { b.launch(cfg) }.map_err(launch_err)?;
    }
    let used = if rows == 0 { 0 } else { chunks };
    col_sum(dev, kernels::module::<T>("rows"), &pw, used, cols, dweight)?;
    col_sum(dev, kernels::module::<T>("rows"), &pb, used, cols, dbias)
}

/// The long-rows backward's tiles (rows.cu `rows_bwd_tile`): threads per block (one column pack
/// each), rows per chunk, and chunks (one partial row each), from the shape alone. About 1024
/// blocks keep a GPU busy; a chunk of 32 to 128 rows keeps the partials (written and read
/// back once) near 2–8 % of the minimum traffic and each thread's accesses in the hundreds; at
/// most 2^24 partial floats per buffer (then longer chunks).
fn tile_geometry(rows: usize, cols: usize, packs: usize) -> (usize, usize, usize) {
    let threads = TILE_THREADS.min(packs.next_multiple_of(32));
    let tiles = packs.div_ceil(threads);
    let mut chunk = (rows * tiles).div_ceil(TILE_BLOCKS).clamp(32, 128);
    let max_chunks = ((1usize << 24) / cols.max(1)).max(1);
    chunk = chunk.max(rows.div_ceil(max_chunks)).max(1);
    (threads, chunk, rows.div_ceil(chunk).max(1))
}

/// The inputs every row backward kernel takes first, in rows.cu's order: dy, x, w, mean, rstd
/// (`rms_norm_bwd_*` without mean).
struct BwdBufs<'a, 'v, T> {
    dy: &'a CudaView<'v, T>,
    x: &'a CudaView<'v, T>,
    weight: Option<&'a CudaView<'v, f32>>,
    mean: Option<&'a CudaView<'v, f32>>,
    rstd: &'a CudaView<'v, f32>,
}

impl<'a, 'v, T: Element> BwdBufs<'a, 'v, T> {
    /// dy, x, w (or null), mean (LayerNorm), rstd.
    fn push_inputs<'l>(&self, b: &mut LaunchArgs<'l>)
    where
        'a: 'l,
    {
        b.arg(self.dy).arg(self.x);
        arg_or_null(b, self.weight);
        if let Some(m) = self.mean {
            b.arg(m);
        }
        b.arg(self.rstd);
    }

    /// The inputs, then dx, dw_part, db_part, rows, cols (the register-resident backward).
    #[allow(clippy::too_many_arguments)]
    fn push<'l, 'm>(
        &self,
        b: &mut LaunchArgs<'l>,
        dx: &'l mut CudaViewMut<'m, T>,
        pw: &'l mut CudaSlice<f32>,
        pb: &'l mut CudaSlice<f32>,
        rows: &'l i64,
        cols: &'l i32,
    ) where
        'a: 'l,
    {
        self.push_inputs(b);
        b.arg(dx).arg(pw).arg(pb).arg(rows).arg(cols);
    }
}

/// The row paths `CUNORM_ROWS_PATH` (read once) forces, a benchmark knob: `block` sends every
/// LayerNorm/RMSNorm forward to the block-per-row kernels (and keeps the contiguous GroupNorm/
/// InstanceNorm forward off the cluster kernel too) and `long` every backward to the long-rows
/// kernels, where the shape would pick the register-resident, team or cluster ones; `reg`
/// sends every forward and backward whose row the register-resident kernels can hold, and
/// which rows.cu instantiates (`reg_instantiated`), to them; `team` sends every forward and
/// backward of aligned rows of whole packs the team kernels hold to them (by default the
/// backward takes them too). One GPU call
/// times each path on the same shapes (`scripts/gpu-run.sh`'s perf group). Results agree within
/// the dtype's tolerance either way (`.ci/run` runs `cunorm check` under each on the fake
/// driver); unset or anything else: the shape decides.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowsPath {
    Auto,
    Block,
    Long,
    Reg,
    Team,
}

fn rows_path() -> RowsPath {
    static PATH: std::sync::OnceLock<RowsPath> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("CUNORM_ROWS_PATH").as_deref() {
        Ok("block") => RowsPath::Block,
        Ok("long") => RowsPath::Long,
        Ok("reg") => RowsPath::Reg,
        Ok("team") => RowsPath::Team,
        _ => RowsPath::Auto,
    })
}

/// The most packs per thread of the team forward for a row of `packs` packs. From the H200
/// timings of 2026-11-27 (run H200-I, `docs/PERF.md`; every choice timed in one call): 4 for
/// LayerNorm f16/bf16 (8 gives `layer_norm_fwd_team8` 168 registers: [4096, 4096] f16 0.0322
/// against 0.0274 ms, [8192, 8192] 0.102 against 0.097), 4 for RMSNorm f16/bf16 up to 512
/// packs ([4096, 4096] f16 0.0226 against 0.0208) and 8 beyond ([8192, 8192] 0.0708 against
/// 0.0753), 8 for f32 (its only timing; ahead of the register-resident and block-per-row
/// kernels at every length it holds). `CUNORM_TEAM_KMAX` (1, 2, 4 or 8, read once) overrides
/// it, a benchmark knob.
fn team_kmax(elem_size: usize, center: bool, packs: usize) -> usize {
    static KNOB: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let knob = *KNOB.get_or_init(|| {
        match std::env::var("CUNORM_TEAM_KMAX")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(k @ (1 | 2 | 4 | 8)) => Some(k),
            _ => None,
        }
    });
    knob.unwrap_or(if elem_size == 4 || (!center && packs > 512) {
        TEAM_KMAX
    } else {
        4
    })
}

/// Teams per block of the team backward for teams wider than a warp: TEAM_BWD_TEAMS, or
/// `CUNORM_TEAM_BWD_TEAMS` (1, 2 or 4, read once), a benchmark knob.
fn team_bwd_teams() -> usize {
    static KNOB: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KNOB.get_or_init(|| {
        match std::env::var("CUNORM_TEAM_BWD_TEAMS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(t @ (1 | 2 | 4)) => t,
            _ => TEAM_BWD_TEAMS,
        }
    })
}

/// Packs per thread the team forward holds at most (rows.cu `ROWS_TEAM_ENTRIES`: 1, 2, 4, 8).
const TEAM_KMAX: usize = 8;
/// Threads per block of the team forward when a team is smaller (several teams per block).
const TEAM_BLOCK: usize = 128;

/// The geometry of the team forward (rows.cu `rows_fwd_team`, rows of whole aligned packs):
/// `tpr` threads per row (a power of two, 4 .. 1024), `k` packs per thread (1, 2, 4 or 8),
/// `block` threads per block. From the row length alone, so every GPU of a model gives the same
/// bits; whether the kernel takes the block depends on its registers (`max_threads`), so another
/// architecture or NVRTC can send a row to another kernel (as for `RegTeam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TeamShape {
    pub tpr: usize,
    pub k: usize,
    pub block: usize,
}

impl TeamShape {
    /// Rows of up to 32 packs: one pack per thread of a team of the next power of two (at
    /// least 4) threads; longer rows: a warp or more per row, each thread with up to `kmax`
    /// packs (a power of two), the team the next power of two of threads that holds the row.
    /// None for rows beyond 1024 threads × `kmax` packs.
    pub(crate) fn of(packs: usize, kmax: usize) -> Option<TeamShape> {
        if packs == 0 {
            return None;
        }
        let (tpr, k) = if packs <= 32 {
            (packs.next_power_of_two().max(4), 1)
        } else {
            let k = packs.div_ceil(32).next_power_of_two().min(kmax);
            (packs.div_ceil(k).next_power_of_two().max(32), k)
        };
        (tpr <= 1024).then_some(TeamShape {
            tpr,
            k,
            block: tpr.max(TEAM_BLOCK),
        })
    }
}

/// Threads per block of the register-resident row kernels when a team is one warp.
const WARP_TEAM_BLOCK: usize = 128;
/// Whether the forward runs the register-resident kernel rather than the block-per-row one,
/// from the H200 timings of 2026-11-26 (`docs/PERF.md`): the register-resident kernel won for
/// rows of one pack per lane (≤ 32 packs) and for f32 rows up to 4096 columns; the block-per-row
/// kernel (one pack per thread of up to 1024, row cached in shared memory, higher occupancy) won
/// for longer f16/bf16 rows and for 8192-column f32 rows.
fn fwd_prefers_reg(elem_size: usize, packs: usize) -> bool {
    packs <= 32 || (elem_size == 4 && packs <= 1024)
}

/// Whether rows.cu has the register-resident kernels for rows of `packs` packs: f32 with up to
/// 4 packs per lane, f16/bf16 with one. The backward runs them wherever they exist and can hold
/// the row and the team backward does not take it first (rows of partial packs, misaligned
/// buffers, or `CUNORM_ROWS_PATH=reg`), from the H100
/// timings of 2026-11-27 (`docs/PERF.md`, runs H100-A and H100-B, every path timed in one call): the register-resident backward won on every f32 row it holds and on
/// f16/bf16 rows of one pack per lane (128 columns: 0.114 against 0.139 ms at [65536, 128]);
/// the long-rows kernels won on longer f16/bf16 rows by 15–27 % ([16384, 1024] f16: 0.107
/// against 0.146 ms), and more teams did not help the register-resident kernel there. The
/// forward's choice among them is `fwd_prefers_reg`.
fn reg_instantiated(elem_size: usize, packs: usize) -> bool {
    packs <= 32 || elem_size == 4
}

/// Most 16-byte packs of x per thread in the register-resident forward and of x and dy in the
/// backward: the largest `KM` rows.cu instantiates (1 for every dtype, `ROWS_REG_ENTRIES_K`;
/// 2 and 4 for f32).
const FWD_REG_K: usize = 4;
/// 16-byte packs per thread the wide forward holds in registers (rows.cu `ROWS_WIDE_K`).
const WIDE_K: usize = 4;
const BWD_REG_K: usize = 4;
/// Teams per block of the team backward for teams wider than a warp (`RegTeam::widened`). On an
/// H200 (2026-11-27, every team forced, ms) two beat one and four at each width: [4096, 4096]
/// f16 (128-thread teams) 0.0723 against 0.0833 with one, [8192, 8192] f16 (256) 0.2275
/// against 0.2703, [4096, 4096] f32 (256) 0.0981 against 0.1083, [16384, 1024] f32 (64) 0.0923
/// against 0.0952 with four. One a block had left [4096, 4096] f16 at 12 % occupancy.
const TEAM_BWD_TEAMS: usize = 2;
/// Fewest teams (partial rows) of a register-resident backward, when there are as many rows.
const BWD_MIN_TEAMS: usize = 264;
/// Most blocks of a row forward launch (the kernels loop over further rows).
const MAX_ROW_BLOCKS: usize = 1 << 20;
/// Most teams (partial rows of column sums) of a register-resident backward.
const BWD_MAX_TEAMS: usize = 8192;
/// Threads per block of the long-rows backward's tiles, and the blocks its chunking aims at.
const TILE_THREADS: usize = 256;
const TILE_BLOCKS: usize = 1024;
/// Partial rows one thread of `rows_col_sum_f32` adds in sequence in the first of two stages.
const COL_SUM_CHUNK: usize = 64;

/// The team of the register-resident row kernels (rows.cu): `tpr` threads per row, each holding
/// `k` 16-byte packs, `per_block` teams per block (a warp each, or one team of the whole block).
/// Derived from the row length alone (whether the kernel can take it depends on its thread and
/// shared-memory limits: `reg_kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RegTeam {
    pub tpr: usize,
    pub k: usize,
    pub per_block: usize,
}

impl RegTeam {
    /// A row of `packs` packs with at most `max_k` per thread, or None when it needs more
    /// threads than `max_threads` (then the shared-memory kernels run).
    pub(crate) fn of(packs: usize, max_k: usize, max_threads: usize) -> Option<RegTeam> {
        if packs <= 32 * max_k {
            let per_block = (max_threads.min(WARP_TEAM_BLOCK) / 32).max(1);
            return Some(RegTeam {
                tpr: 32,
                k: packs.div_ceil(32).max(1),
                per_block,
            });
        }
        let tpr = packs.div_ceil(max_k).next_multiple_of(32);
        (tpr <= max_threads).then(|| RegTeam {
            tpr,
            k: packs.div_ceil(tpr),
            per_block: 1,
        })
    }

    fn block_threads(&self) -> u32 {
        (self.tpr * self.per_block) as u32
    }

    /// The team backward's blocks: teams wider than a warp, `teams` to a block (their partials
    /// are summed in the block, so more resident teams cost no partial traffic) where the
    /// block's `max_threads` and shared memory's room (`max_teams`) allow; at least one.
    pub(crate) fn widened(self, teams: usize, max_threads: usize, max_teams: usize) -> RegTeam {
        if self.tpr <= 32 {
            return self;
        }
        RegTeam {
            per_block: teams.min(max_threads / self.tpr).min(max_teams).max(1),
            ..self
        }
    }
}

/// The register-resident kernel for rows of `packs` packs (`<op>_<stage>_<kind><KM>_<dtype>`,
/// kind `reg` or, for the team backward, `team`; KM the packs per thread rounded up to 1, 2 or
/// 4) and its team, or None when the row needs more threads, or the team more shared memory,
/// than the kernel allows (then the shared-memory kernels run).
fn reg_kernel<T: Element>(
    dev: &CudaDevice,
    op: &str,
    stage: &str,
    kind: &str,
    packs: usize,
    max_k: usize,
    smem_per_team: usize,
) -> Result<Option<(RegTeam, Kernel)>> {
    let Some(mut team) = RegTeam::of(packs, max_k, 1024) else {
        return Ok(None);
    };
    let km = team.k.next_power_of_two();
    let k = dev.kernel(
        kernels::module::<T>("rows"),
        &kernels::name::<T>(&format!("{op}_{stage}_{kind}{km}")),
    )?;
    if kind == "team" {
        let room = k.max_dynamic_smem / smem_per_team.max(1);
        team = team.widened(team_bwd_teams(), k.max_threads as usize, room);
    }
    let fits = team.block_threads() <= k.max_threads
        && team.per_block * smem_per_team <= k.max_dynamic_smem;
    Ok(fits.then_some((team, k)))
}

/// out[j] = Σ_p part[p·cols + j] in a fixed order: in one launch for up to COL_SUM_CHUNK partial
/// rows, else chunk sums first (one thread per column and chunk), then their sum.
fn col_sum(
    dev: &CudaDevice,
    module: &'static str,
    part: &cudarc::driver::CudaSlice<f32>,
    parts: usize,
    cols: usize,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    if parts <= COL_SUM_CHUNK {
        return col_sum_launch(dev, module, &part.slice(..), parts, cols, parts.max(1), out);
    }
    let chunks = parts.div_ceil(COL_SUM_CHUNK);
    let mut mid = dev.alloc::<f32>(chunks * cols)?;
    col_sum_launch(
        dev,
        module,
        &part.slice(..),
        parts,
        cols,
        COL_SUM_CHUNK,
        &mut mid.slice_mut(..),
    )?;
    col_sum_launch(dev, module, &mid.slice(..), chunks, cols, chunks, out)
}

fn col_sum_launch(
    dev: &CudaDevice,
    module: &'static str,
    part: &CudaView<f32>,
    parts: usize,
    cols: usize,
    chunk: usize,
    out: &mut CudaViewMut<f32>,
) -> Result<()> {
    let chunks = parts.div_ceil(chunk).max(1);
    check_len("column partials", part.len(), parts * cols)?;
    check_len("column sums", out.len(), chunks * cols)?;
    let f = dev.function(module, "rows_col_sum_f32")?;
    let (parts_i, cols_i, chunk_i) = (
        to_i32("parts", parts)?,
        to_i32("cols", cols)?,
        to_i32("chunk", chunk)?,
    );
    let mut b = dev.stream().launch_builder(&f);
    b.arg(part)
        .arg(out)
        .arg(&parts_i)
        .arg(&cols_i)
        .arg(&chunk_i);
    let cfg = LaunchConfig {
        grid_dim: (grid(cols.div_ceil(256))?, to_u32_grid(chunks)?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: part holds parts·cols floats, out one row per chunk (checked above).
    unsafe { b.launch(cfg) }.map_err(launch_err)?;
    Ok(())
}

fn to_u32_grid(n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= 65_535)
        .ok_or_else(|| {
            crate::Error::Shape(format!("cuda launch: {n} column chunks; split the input"))
        })
}

#[cfg(test)]
mod tests {
    use super::{
        cluster_bwd_chunks, cluster_bwd_threads, cluster_plan, fwd_prefers_reg, reg_instantiated,
        tile_geometry, ClusterPlan, RegTeam, TeamShape, BWD_REG_K, CLUSTER_BWD_BLOCKS,
        CLUSTER_BWD_K, CLUSTER_K, CLUSTER_MIN_ROW_BYTES, FWD_REG_K, TEAM_BWD_TEAMS, TEAM_KMAX,
    };

    /// The cluster backward holds the row (x and dy) in blocks of 256 or 512 threads of a kernel
    /// that exists, and its chunks cover every row once with few partial rows.
    #[test]
    fn cluster_backward_holds_the_row_and_chunks_cover_the_rows() {
        let src = include_str!("../../../kernels/rows.cu");
        let defines = |name: &str, v: usize| {
            src.lines().any(|l| {
                l.split_whitespace().collect::<Vec<_>>() == ["#define", name, &v.to_string()]
            })
        };
        assert!(defines("ROWS_CLUSTER_BWD_K", CLUSTER_BWD_K));
        assert!(src.contains(&format!("ROWS_CLUSTER_BWD(T, NAME, {CLUSTER_BWD_BLOCKS})")));
        for packs in 1..=40_000 {
            match cluster_bwd_threads(packs) {
                Some(t) => {
                    assert!(CLUSTER_BWD_BLOCKS * t * CLUSTER_BWD_K >= packs);
                    assert!(t == 512 || CLUSTER_BWD_BLOCKS * t * CLUSTER_BWD_K * 2 >= packs);
                    assert!(t == 256 || packs > CLUSTER_BWD_BLOCKS * 256 * CLUSTER_BWD_K);
                }
                None => assert!(packs > CLUSTER_BWD_BLOCKS * 512 * CLUSTER_BWD_K),
            }
        }
        // LayerNorm [1024, 65536]: f16/bf16 8 192 packs (256 threads), f32 16 384 (512).
        assert_eq!(cluster_bwd_threads(8_192), Some(256));
        assert_eq!(cluster_bwd_threads(16_384), Some(512));
        for rows in [1, 2, 7, 64, 1000, 1024, 4096, 100_000] {
            for cols in [40_000, 65_536, 70_000] {
                let (chunk, clusters) = cluster_bwd_chunks(rows, cols);
                assert!(chunk * clusters >= rows && chunk * (clusters - 1) < rows.max(1));
                assert!((8..=128).contains(&chunk) || clusters * cols <= 1 << 24);
                assert!(clusters * cols <= (1 << 24) || clusters == 1);
            }
        }
        assert_eq!(cluster_bwd_chunks(1024, 65_536), (16, 64));
    }

    /// The cluster forward's shape holds the whole row, in a kernel that exists, and is the
    /// smallest of its candidates; the standard shapes get the plans docs/PERF.md names.
    #[test]
    fn cluster_plan_covers_the_row_with_kernels_that_exist() {
        let src = include_str!("../../../kernels/rows.cu");
        assert!(
            src.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["#define", "ROWS_CLUSTER_K", &CLUSTER_K.to_string()]),
            "rows.cu #define ROWS_CLUSTER_K {CLUSTER_K}"
        );
        let names: Vec<String> = crate::ops::kernels::entry_points()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        // Every row length the cluster forward takes: more than 64 KiB (4 096 packs).
        let mut last = None;
        for packs in (CLUSTER_MIN_ROW_BYTES / 16 + 1)..=40_000 {
            let Some(p) = cluster_plan(packs) else {
                assert!(packs > 8 * 512 * CLUSTER_K, "no plan for {packs} packs");
                continue;
            };
            assert!(p.blocks * p.threads * CLUSTER_K >= packs, "{packs}: {p:?}");
            assert!(p.threads % 32 == 0 && p.threads <= 512, "{p:?}");
            for base in ["layer_norm_fwd", "rms_norm_fwd", "group_norm_fwd"] {
                let n = format!("{base}_cluster{}_f32", p.blocks);
                assert!(names.contains(&n), "no kernel {n}");
            }
            // Plans only grow with the row.
            if let Some(q) = last {
                let size = |p: ClusterPlan| p.blocks * p.threads;
                assert!(size(p) >= size(q), "{packs}: {p:?} after {q:?}");
            }
            last = Some(p);
        }
        assert_eq!(cluster_plan(8 * 512 * CLUSTER_K + 1), None);
        let plan = |blocks, threads| Some(ClusterPlan { blocks, threads });
        // LayerNorm [1024, 65536]: f16/bf16 (8 192 packs), f32 (16 384 packs).
        assert_eq!(cluster_plan(65_536 / 8), plan(4, 256));
        assert_eq!(cluster_plan(65_536 / 4), plan(8, 256));
        // GroupNorm f32 [8, 256, 128, 128], groups of 8 channels (131 072 values, 512 KiB).
        assert_eq!(cluster_plan(131_072 / 4), plan(8, 512));
    }
    use crate::dtype::Element;
    use crate::ops::kernels;

    /// Every register-resident kernel the dispatch can ask for (its name, in the module it asks)
    /// is an entry point rows.cu has: the forward picks it where `fwd_prefers_reg` (or, forced,
    /// `reg_instantiated`) holds, the backward where `reg_instantiated` holds.
    fn reg_kernels_exist<T: Element>() {
        let entries = kernels::entry_points();
        let module = kernels::module::<T>("rows");
        let pack = 16 / T::DTYPE.size();
        for packs in 1..=4096usize {
            let size = T::DTYPE.size();
            assert!(!fwd_prefers_reg(size, packs) || reg_instantiated(size, packs));
            if !reg_instantiated(size, packs) {
                continue;
            }
            for (stage, max_k) in [("fwd", FWD_REG_K), ("bwd", BWD_REG_K)] {
                let Some(team) = RegTeam::of(packs, max_k, 1024) else {
                    continue;
                };
                let km = team.k.next_power_of_two();
                for op in ["layer_norm", "rms_norm"] {
                    let name = kernels::name::<T>(&format!("{op}_{stage}_reg{km}"));
                    assert!(
                        entries.iter().any(|(m, n)| *m == module && *n == name),
                        "{} columns: {name} is not in {module}",
                        packs * pack
                    );
                }
            }
        }
    }

    #[test]
    fn the_dispatch_asks_only_for_register_resident_kernels_that_exist() {
        reg_kernels_exist::<f32>();
        reg_kernels_exist::<half::f16>();
        reg_kernels_exist::<half::bf16>();
    }

    /// The team forward's geometry holds every pack of the row, with the fewest packs per thread
    /// and threads per team, within a block; and the kernel it names is in the dtype's module.
    #[test]
    fn team_shape_covers_the_row_and_names_kernels_that_exist() {
        let entries = kernels::entry_points();
        for kmax in [1, 2, 4, TEAM_KMAX] {
            for packs in 1..=(1024 * TEAM_KMAX + 9) {
                let Some(t) = TeamShape::of(packs, kmax) else {
                    assert!(packs > 1024 * kmax, "{packs} packs, kmax {kmax}: no shape");
                    continue;
                };
                assert!(
                    t.tpr.is_power_of_two() && (4..=1024).contains(&t.tpr),
                    "{t:?}"
                );
                assert!(t.k.is_power_of_two() && t.k <= kmax.max(1), "{t:?}");
                assert!(t.tpr * t.k >= packs, "{t:?} misses packs of {packs}");
                // k the least power of two for the team (K is a template constant), and the
                // team no wider than it needs (beyond its floor of 4 threads, or 32 with k > 1).
                assert!(t.tpr * (t.k / 2) < packs, "{t:?}: k too large for {packs}");
                let floor = if t.k > 1 { 32 } else { 4 };
                assert!(
                    t.tpr == floor || (t.tpr / 2) * t.k < packs,
                    "{t:?} for {packs}"
                );
                assert!(
                    t.block % t.tpr == 0 && t.block >= 32 && t.block <= 1024,
                    "{t:?}"
                );
                // The team backward (forced) asks for RegTeam's geometry under "team".
                let bwd_k = RegTeam::of(packs, BWD_REG_K, 1024).map(|b| b.k.next_power_of_two());
                for module in ["rows.f32", "rows.f16", "rows.bf16"] {
                    let dt = module.trim_start_matches("rows.");
                    for op in ["layer_norm", "rms_norm"] {
                        let mut names = vec![format!("{op}_fwd_team{}_{dt}", t.k)];
                        names.extend(bwd_k.map(|k| format!("{op}_bwd_team{k}_{dt}")));
                        for name in names {
                            assert!(
                                entries.iter().any(|(m, n)| *m == module && *n == name),
                                "{name}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn tile_geometry_covers_the_rows_within_its_bounds() {
        for rows in [0, 1, 2, 31, 33, 1000, 4096, 100_000, 3_000_000] {
            for cols in [1usize, 7, 16_385, 65_536, 1 << 20] {
                let packs = cols.div_ceil(4);
                let (threads, chunk, chunks) = tile_geometry(rows, cols, packs);
                assert!(threads % 32 == 0 && (32..=256).contains(&threads));
                assert!(chunk >= 1 && chunks >= 1);
                assert!(chunk * chunks >= rows, "{rows}x{cols}: rows left out");
                assert!(
                    chunk * (chunks - 1) < rows.max(1),
                    "{rows}x{cols}: an empty chunk"
                );
                assert!(
                    chunks * cols <= (1 << 24) || chunks == 1,
                    "{rows}x{cols}: partials"
                );
                if chunks * cols * 128 <= (1 << 24) {
                    assert!(chunk <= 128, "{rows}x{cols}: {chunk} rows per chunk");
                }
            }
        }
    }

    #[test]
    fn reg_team_covers_the_row_within_its_limits() {
        for max_k in [1, 2, 4] {
            for max_threads in [288, 512, 1024] {
                for packs in (1..5000).step_by(7) {
                    match RegTeam::of(packs, max_k, max_threads) {
                        Some(t) => {
                            assert!(t.tpr % 32 == 0 && t.tpr <= max_threads.max(32));
                            assert!(t.k >= 1 && t.k <= max_k, "{t:?} for {packs} packs");
                            assert!(t.tpr * t.k >= packs, "{t:?} misses packs of {packs}");
                            // No idle pack slot column: the last pack slot is needed.
                            assert!(t.tpr * (t.k - 1) < packs);
                            assert!(t.per_block == 1 || t.tpr == 32);
                            assert!(t.tpr * t.per_block <= max_threads.max(32));
                        }
                        None => assert!(packs.div_ceil(max_k) > max_threads - 31),
                    }
                }
            }
        }
    }

    /// The team backward's blocks: teams wider than a warp two to a block where the block's
    /// threads and shared memory allow (never below one team); warp teams keep their blocks.
    #[test]
    fn team_backward_blocks_stay_within_threads_and_shared_memory() {
        for packs in (1..5000).step_by(3) {
            let Some(t) = RegTeam::of(packs, BWD_REG_K, 1024) else {
                continue;
            };
            for (room, max_threads) in [(0, 1024), (1, 1024), (2, 640), (3, 1024), (100, 256)] {
                let w = t.widened(TEAM_BWD_TEAMS, max_threads, room);
                assert_eq!((w.tpr, w.k), (t.tpr, t.k));
                if t.tpr == 32 {
                    assert_eq!(w.per_block, t.per_block);
                    continue;
                }
                assert!(w.per_block >= 1 && w.per_block <= TEAM_BWD_TEAMS);
                assert!(w.per_block == 1 || w.per_block <= room, "{w:?} room {room}");
                assert!(
                    w.per_block == 1 || w.tpr * w.per_block <= max_threads,
                    "{w:?}"
                );
                if room >= 2 && t.tpr * 2 <= max_threads {
                    assert_eq!(w.per_block, 2, "{w:?}: one team where two fit");
                }
            }
        }
    }
}
