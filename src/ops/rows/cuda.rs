//! The rows family on CUDA: LayerNorm and RMSNorm launches (`kernels/rows.cu`).
//!
//! Two levels: the tensor level the op fronts call (`layer_norm_fwd`, ...), and below it the
//! public launch layer over caller-held cudarc views (`layer_norm_forward`, ..., re-exported as
//! [`crate::raw`]). Every launch function checks lengths (an `Err`, never a panic or an
//! out-of-bounds launch), queues its kernels on the device's stream and returns without
//! synchronizing. Element type `T` is `f32`, `f16` or `bf16`; parameters, statistics and
//! parameter gradients are `f32`.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use crate::cuda::launch::{arg_or_null, block_threads, check_len, grid, launch_err, pack, to_i32};
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

/// Launch configuration of the row forward kernel. The row stays on chip (as T) when it fits in
/// the dynamic shared memory the kernel was opted in to at load (the device's limit less the
/// kernel's static reduction scratch).
pub(crate) fn rows_fwd_config<T: Element>(
    dev: &CudaDevice,
    k: &Kernel,
    rows: usize,
    cols: usize,
) -> Result<(LaunchConfig, i32)> {
    let packs = cols.div_ceil(pack::<T>());
    let threads = block_threads(k, packs);
    let smem = cols * T::DTYPE.size();
    let cache = smem <= k.max_dynamic_smem;
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
    let (rows_i, cols_i) = (rows as i64, to_i32("cols", cols)?);
    let center = mean.is_some();
    let name = kernels::name::<T>(if center {
        "layer_norm_fwd"
    } else {
        "rms_norm_fwd"
    });
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
        let name = kernels::name::<T>(if center {
            "layer_norm_bwd"
        } else {
            "rms_norm_bwd"
        });
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
    let f = dev.function("rows", "rows_col_sum_f32")?;
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
